//! Response parsers: [`decode_response`] verifies a `Response` envelope with the
//! flatbuffers verifier and converts it into owned Rust types. Fetch payload
//! ranges become zero-copy [`Bytes`] slices of the received frame, bounds-checked.

use bytes::Bytes;
use flatbuffers::{ForwardsUOffset, Vector};
use sluice_schema::wire;

use crate::error::{Code, Error, Result};
use crate::frame::Frame;
use crate::request::TopicPartitions;

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
    /// Those replicas (node ids, ascending).
    pub in_sync_replicas: Vec<u32>,
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

/// A group heartbeat's answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupHeartbeatResult {
    /// Response-level error.
    pub error: Code,
    /// Explanation.
    pub message: Option<String>,
    /// The member's id (assigned by the broker on join).
    pub member_id: String,
    /// The member's epoch.
    pub member_epoch: i32,
    /// How often to heartbeat (0: not said).
    pub heartbeat_interval_ms: u32,
    /// Every partition the member owns from now on.
    pub assignment: Vec<TopicPartitions>,
    /// With NotLeader: the coordinator's node (0: unknown).
    pub leader_node: u32,
}

/// Commit outcome of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetCommitPartitionResult {
    /// Partition.
    pub partition: u32,
    /// Error code.
    pub error: Code,
}

/// An offset commit's answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OffsetCommitResult {
    /// Request-level error (all partitions were committed, or none).
    pub error: Code,
    /// Explanation.
    pub message: Option<String>,
    /// Per-partition outcomes.
    pub topics: TopicResults<OffsetCommitPartitionResult>,
    /// With NotLeader: the coordinator's node (0: unknown).
    pub leader_node: u32,
}

/// One committed offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedOffset {
    /// Partition.
    pub partition: u32,
    /// The next offset to consume; `None`: nothing committed.
    pub offset: Option<u64>,
    /// Client metadata.
    pub metadata: Option<String>,
    /// When it was committed (ms since the epoch).
    pub commit_timestamp_ms: i64,
}

/// An offset fetch's answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OffsetFetchResult {
    /// Response-level error.
    pub error: Code,
    /// Explanation.
    pub message: Option<String>,
    /// Committed offsets per topic.
    pub topics: TopicResults<CommittedOffset>,
    /// With NotLeader: the coordinator's node (0: unknown).
    pub leader_node: u32,
}

/// A group in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSummary {
    /// Group id.
    pub group_id: String,
    /// `"empty"`, `"stable"` or `"reconciling"`.
    pub state: String,
    /// Members.
    pub members: u32,
    /// Group epoch.
    pub group_epoch: u64,
}

/// A group listing's answer (one node's groups).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListGroupsResult {
    /// Response-level error.
    pub error: Code,
    /// Explanation.
    pub message: Option<String>,
    /// Groups.
    pub groups: Vec<GroupSummary>,
}

/// One member of a described group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    /// Member id.
    pub member_id: String,
    /// Static instance id.
    pub instance_id: Option<String>,
    /// Client id of its connection.
    pub client_id: Option<String>,
    /// Its epoch.
    pub member_epoch: i32,
    /// Subscribed topics.
    pub subscribed_topics: Vec<String>,
    /// What it owns now.
    pub assignment: Vec<TopicPartitions>,
    /// What the assignor wants it to own.
    pub target: Vec<TopicPartitions>,
    /// Session timeout.
    pub session_timeout_ms: u32,
    /// Milliseconds since its last heartbeat.
    pub last_heartbeat_ms_ago: u64,
}

/// A group description.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupDescription {
    /// Response-level error.
    pub error: Code,
    /// Explanation.
    pub message: Option<String>,
    /// Group id.
    pub group_id: String,
    /// `"empty"`, `"stable"` or `"reconciling"`.
    pub state: String,
    /// Group epoch.
    pub group_epoch: u64,
    /// The group epoch the target assignment was computed for.
    pub assignment_epoch: u64,
    /// Assignor.
    pub assignor: String,
    /// Members.
    pub members: Vec<GroupMember>,
    /// Every committed offset.
    pub offsets: TopicResults<CommittedOffset>,
    /// With NotLeader: the coordinator's node (0: unknown).
    pub leader_node: u32,
}

/// A group deletion's answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeleteGroupResult {
    /// Response-level error.
    pub error: Code,
    /// Explanation.
    pub message: Option<String>,
    /// With NotLeader: the coordinator's node (0: unknown).
    pub leader_node: u32,
}

/// An InitProducerId answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InitProducerIdResult {
    /// Response-level error.
    pub error: Code,
    /// Explanation.
    pub message: Option<String>,
    /// Producer id.
    pub producer_id: i64,
    /// Producer epoch.
    pub producer_epoch: i16,
}

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
    /// GroupHeartbeat.
    GroupHeartbeat(GroupHeartbeatResult),
    /// OffsetCommit.
    OffsetCommit(OffsetCommitResult),
    /// OffsetFetch.
    OffsetFetch(OffsetFetchResult),
    /// ListGroups.
    ListGroups(ListGroupsResult),
    /// DescribeGroup.
    DescribeGroup(GroupDescription),
    /// DeleteGroup.
    DeleteGroup(DeleteGroupResult),
    /// InitProducerId.
    InitProducerId(InitProducerIdResult),
}

impl ResponseBody {
    /// The response-level error, explanation and NotLeader hint of a group
    /// response (`None` for other kinds).
    pub fn group_status(&self) -> Option<(Code, Option<&str>, u32)> {
        match self {
            ResponseBody::GroupHeartbeat(r) => Some((r.error, r.message.as_deref(), r.leader_node)),
            ResponseBody::OffsetCommit(r) => Some((r.error, r.message.as_deref(), r.leader_node)),
            ResponseBody::OffsetFetch(r) => Some((r.error, r.message.as_deref(), r.leader_node)),
            ResponseBody::DescribeGroup(r) => Some((r.error, r.message.as_deref(), r.leader_node)),
            ResponseBody::DeleteGroup(r) => Some((r.error, r.message.as_deref(), r.leader_node)),
            ResponseBody::ListGroups(r) => Some((r.error, r.message.as_deref(), 0)),
            _ => None,
        }
    }
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
        wire::ResponseBody::GroupHeartbeatResponse => envelope
            .body_as_group_heartbeat_response()
            .map(group_heartbeat),
        wire::ResponseBody::OffsetCommitResponse => {
            envelope.body_as_offset_commit_response().map(offset_commit)
        }
        wire::ResponseBody::OffsetFetchResponse => {
            envelope.body_as_offset_fetch_response().map(offset_fetch)
        }
        wire::ResponseBody::ListGroupsResponse => {
            envelope.body_as_list_groups_response().map(list_groups)
        }
        wire::ResponseBody::DescribeGroupResponse => envelope
            .body_as_describe_group_response()
            .map(describe_group),
        wire::ResponseBody::DeleteGroupResponse => {
            envelope.body_as_delete_group_response().map(|body| {
                ResponseBody::DeleteGroup(DeleteGroupResult {
                    error: Code::from_wire(body.error()),
                    message: body.message().map(str::to_owned),
                    leader_node: body.leader_node(),
                })
            })
        }
        wire::ResponseBody::InitProducerIdResponse => {
            envelope.body_as_init_producer_id_response().map(|body| {
                ResponseBody::InitProducerId(InitProducerIdResult {
                    error: Code::from_wire(body.error()),
                    message: body.message().map(str::to_owned),
                    producer_id: body.producer_id(),
                    producer_epoch: body.producer_epoch(),
                })
            })
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
                    in_sync_replicas: partition
                        .in_sync_replicas()
                        .map_or(Vec::new(), |r| r.iter().collect()),
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

type TopicPartitionsList<'a> = Option<Vector<'a, ForwardsUOffset<wire::TopicPartitions<'a>>>>;

fn topic_partitions(list: TopicPartitionsList<'_>) -> Vec<TopicPartitions> {
    opt_vec(list)
        .map(|entry| TopicPartitions {
            topic: entry.topic().to_owned(),
            partitions: entry
                .partitions()
                .map_or(Vec::new(), |p| p.iter().collect()),
        })
        .collect()
}

fn strings(list: Option<Vector<'_, ForwardsUOffset<&str>>>) -> Vec<String> {
    opt_vec(list).map(str::to_owned).collect()
}

fn group_heartbeat(body: wire::GroupHeartbeatResponse<'_>) -> ResponseBody {
    ResponseBody::GroupHeartbeat(GroupHeartbeatResult {
        error: Code::from_wire(body.error()),
        message: body.message().map(str::to_owned),
        member_id: body.member_id().unwrap_or_default().to_owned(),
        member_epoch: body.member_epoch(),
        heartbeat_interval_ms: body.heartbeat_interval_ms(),
        assignment: topic_partitions(body.assignment()),
        leader_node: body.leader_node(),
    })
}

fn offset_commit(body: wire::OffsetCommitResponse<'_>) -> ResponseBody {
    let topics = opt_vec(body.topics())
        .map(|topic| {
            let partitions = opt_vec(topic.partitions())
                .map(|partition| OffsetCommitPartitionResult {
                    partition: partition.partition(),
                    error: Code::from_wire(partition.error()),
                })
                .collect();
            (topic.name().to_owned(), partitions)
        })
        .collect();
    ResponseBody::OffsetCommit(OffsetCommitResult {
        error: Code::from_wire(body.error()),
        message: body.message().map(str::to_owned),
        topics,
        leader_node: body.leader_node(),
    })
}

fn committed_offsets(
    topics: Option<Vector<'_, ForwardsUOffset<wire::OffsetFetchTopic<'_>>>>,
) -> TopicResults<CommittedOffset> {
    opt_vec(topics)
        .map(|topic| {
            let mut partitions: Vec<CommittedOffset> = opt_vec(topic.partitions())
                .map(|partition| CommittedOffset {
                    partition: partition.partition(),
                    offset: u64::try_from(partition.offset()).ok(),
                    metadata: partition
                        .metadata()
                        .filter(|text| !text.is_empty())
                        .map(str::to_owned),
                    commit_timestamp_ms: partition.commit_timestamp_ms(),
                })
                .collect();
            partitions.sort_by_key(|partition| partition.partition);
            (topic.name().to_owned(), partitions)
        })
        .collect()
}

fn offset_fetch(body: wire::OffsetFetchResponse<'_>) -> ResponseBody {
    ResponseBody::OffsetFetch(OffsetFetchResult {
        error: Code::from_wire(body.error()),
        message: body.message().map(str::to_owned),
        topics: committed_offsets(body.topics()),
        leader_node: body.leader_node(),
    })
}

fn list_groups(body: wire::ListGroupsResponse<'_>) -> ResponseBody {
    let groups = opt_vec(body.groups())
        .map(|group| GroupSummary {
            group_id: group.group_id().to_owned(),
            state: group.state().unwrap_or_default().to_owned(),
            members: group.members(),
            group_epoch: group.group_epoch(),
        })
        .collect();
    ResponseBody::ListGroups(ListGroupsResult {
        error: Code::from_wire(body.error()),
        message: body.message().map(str::to_owned),
        groups,
    })
}

fn describe_group(body: wire::DescribeGroupResponse<'_>) -> ResponseBody {
    let members = opt_vec(body.members())
        .map(|member| GroupMember {
            member_id: member.member_id().to_owned(),
            instance_id: member.instance_id().map(str::to_owned),
            client_id: member.client_id().map(str::to_owned),
            member_epoch: member.member_epoch(),
            subscribed_topics: strings(member.subscribed_topics()),
            assignment: topic_partitions(member.assignment()),
            target: topic_partitions(member.target()),
            session_timeout_ms: member.session_timeout_ms(),
            last_heartbeat_ms_ago: member.last_heartbeat_ms_ago(),
        })
        .collect();
    ResponseBody::DescribeGroup(GroupDescription {
        error: Code::from_wire(body.error()),
        message: body.message().map(str::to_owned),
        group_id: body.group_id().unwrap_or_default().to_owned(),
        state: body.state().unwrap_or_default().to_owned(),
        group_epoch: body.group_epoch(),
        assignment_epoch: body.assignment_epoch(),
        assignor: body.assignor().unwrap_or_default().to_owned(),
        members,
        offsets: committed_offsets(body.offsets()),
        leader_node: body.leader_node(),
    })
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

    fn envelope_of(body: &crate::request::RequestBody) -> Vec<u8> {
        let mut fbb = FlatBufferBuilder::new();
        crate::request::encode_request(&mut fbb, 9, "me", body).to_vec()
    }

    #[test]
    fn group_requests_encode_every_field() {
        use crate::request::{GroupHeartbeatRequest, OffsetCommitSpec, RequestBody};
        let heartbeat = RequestBody::GroupHeartbeat(GroupHeartbeatRequest {
            group_id: "g".into(),
            member_id: "m-1".into(),
            member_epoch: 3,
            instance_id: Some("i".into()),
            session_timeout_ms: 6000,
            rebalance_timeout_ms: 7000,
            subscribed_topics: None,
            assignor: None,
            owned: Some(Vec::new()),
        });
        let envelope = envelope_of(&heartbeat);
        let request = flatbuffers::root::<wire::Request>(&envelope).unwrap();
        let body = request.body_as_group_heartbeat_request().unwrap();
        assert_eq!(body.group_id(), "g");
        assert_eq!(body.member_id(), Some("m-1"));
        assert_eq!(body.member_epoch(), 3);
        assert_eq!(body.instance_id(), Some("i"));
        assert_eq!(
            (body.session_timeout_ms(), body.rebalance_timeout_ms()),
            (6000, 7000)
        );
        assert!(
            body.subscribed_topics().is_none(),
            "unchanged subscription is absent"
        );
        assert_eq!(
            body.owned().map(|owned| owned.len()),
            Some(0),
            "owns nothing: an empty list"
        );

        let join = RequestBody::GroupHeartbeat(GroupHeartbeatRequest {
            group_id: "g".into(),
            subscribed_topics: Some(vec!["a".into(), "b".into()]),
            assignor: Some("range".into()),
            owned: Some(vec![TopicPartitions {
                topic: "a".into(),
                partitions: vec![1, 4],
            }]),
            ..GroupHeartbeatRequest::default()
        });
        let envelope = envelope_of(&join);
        let request = flatbuffers::root::<wire::Request>(&envelope).unwrap();
        let body = request.body_as_group_heartbeat_request().unwrap();
        assert_eq!(body.member_id(), None);
        assert_eq!(body.member_epoch(), 0);
        assert_eq!(strings(body.subscribed_topics()), vec!["a", "b"]);
        assert_eq!(body.assignor(), Some("range"));
        assert_eq!(
            topic_partitions(body.owned()),
            vec![TopicPartitions {
                topic: "a".into(),
                partitions: vec![1, 4]
            }]
        );

        let commit = RequestBody::OffsetCommit {
            group_id: "g".into(),
            member_id: String::new(),
            member_epoch: -1,
            topics: vec![(
                "a".into(),
                vec![OffsetCommitSpec {
                    partition: 2,
                    offset: 99,
                    metadata: Some("x".into()),
                }],
            )],
        };
        let envelope = envelope_of(&commit);
        let request = flatbuffers::root::<wire::Request>(&envelope).unwrap();
        let body = request.body_as_offset_commit_request().unwrap();
        assert_eq!((body.member_id(), body.member_epoch()), (None, -1));
        let partition = body.topics().unwrap().get(0).partitions().unwrap().get(0);
        assert_eq!((partition.partition(), partition.offset()), (2, 99));
        assert_eq!(partition.metadata(), Some("x"));

        for (body, kind) in [
            (
                RequestBody::ListGroups,
                wire::RequestBody::ListGroupsRequest,
            ),
            (
                RequestBody::InitProducerId,
                wire::RequestBody::InitProducerIdRequest,
            ),
            (
                RequestBody::DeleteGroup {
                    group_id: "g".into(),
                },
                wire::RequestBody::DeleteGroupRequest,
            ),
            (
                RequestBody::DescribeGroup {
                    group_id: "g".into(),
                },
                wire::RequestBody::DescribeGroupRequest,
            ),
            (
                RequestBody::OffsetFetch {
                    group_id: "g".into(),
                    topics: None,
                },
                wire::RequestBody::OffsetFetchRequest,
            ),
        ] {
            let envelope = envelope_of(&body);
            let request = flatbuffers::root::<wire::Request>(&envelope).unwrap();
            assert_eq!(request.body_type(), kind);
        }
    }

    fn finish(
        mut fbb: FlatBufferBuilder<'static>,
        kind: wire::ResponseBody,
        body: flatbuffers::WIPOffset<flatbuffers::UnionWIPOffset>,
    ) -> ResponseBody {
        let response = wire::Response::create(
            &mut fbb,
            &wire::ResponseArgs {
                correlation_id: 1,
                body_type: kind,
                body: Some(body),
                ..Default::default()
            },
        );
        fbb.finish(response, None);
        let frame = Frame {
            envelope: Bytes::copy_from_slice(fbb.finished_data()),
            payload: Bytes::new(),
        };
        decode_response(&frame).unwrap().body
    }

    #[test]
    fn group_responses_decode() {
        let mut fbb = FlatBufferBuilder::new();
        let partitions = fbb.create_vector(&[0u32, 3]);
        let topic = fbb.create_string("orders");
        let entry = wire::TopicPartitions::create(
            &mut fbb,
            &wire::TopicPartitionsArgs {
                topic: Some(topic),
                partitions: Some(partitions),
            },
        );
        let assignment = fbb.create_vector(&[entry]);
        let member_id = fbb.create_string("m-7");
        let body = wire::GroupHeartbeatResponse::create(
            &mut fbb,
            &wire::GroupHeartbeatResponseArgs {
                member_id: Some(member_id),
                member_epoch: 12,
                heartbeat_interval_ms: 900,
                assignment: Some(assignment),
                ..Default::default()
            },
        );
        let decoded = finish(
            fbb,
            wire::ResponseBody::GroupHeartbeatResponse,
            body.as_union_value(),
        );
        let ResponseBody::GroupHeartbeat(result) = decoded else {
            panic!("not a heartbeat response");
        };
        assert_eq!(result.member_id, "m-7");
        assert_eq!(
            (result.member_epoch, result.heartbeat_interval_ms),
            (12, 900)
        );
        assert_eq!(
            result.assignment,
            vec![TopicPartitions {
                topic: "orders".into(),
                partitions: vec![0, 3]
            }]
        );

        let mut fbb = FlatBufferBuilder::new();
        let none = wire::OffsetFetchPartition::create(
            &mut fbb,
            &wire::OffsetFetchPartitionArgs {
                partition: 1,
                offset: -1,
                ..Default::default()
            },
        );
        let metadata = fbb.create_string("meta");
        let some = wire::OffsetFetchPartition::create(
            &mut fbb,
            &wire::OffsetFetchPartitionArgs {
                partition: 0,
                offset: 17,
                metadata: Some(metadata),
                commit_timestamp_ms: 5,
            },
        );
        let partitions = fbb.create_vector(&[none, some]);
        let name = fbb.create_string("orders");
        let topic = wire::OffsetFetchTopic::create(
            &mut fbb,
            &wire::OffsetFetchTopicArgs {
                name: Some(name),
                partitions: Some(partitions),
            },
        );
        let offsets = fbb.create_vector(&[topic]);
        let member_id = fbb.create_string("m-1");
        let member = wire::GroupMemberDescription::create(
            &mut fbb,
            &wire::GroupMemberDescriptionArgs {
                member_id: Some(member_id),
                member_epoch: 4,
                session_timeout_ms: 45_000,
                last_heartbeat_ms_ago: 120,
                ..Default::default()
            },
        );
        let members = fbb.create_vector(&[member]);
        let state = fbb.create_string("stable");
        let group_id = fbb.create_string("g");
        let body = wire::DescribeGroupResponse::create(
            &mut fbb,
            &wire::DescribeGroupResponseArgs {
                group_id: Some(group_id),
                state: Some(state),
                group_epoch: 4,
                assignment_epoch: 4,
                members: Some(members),
                offsets: Some(offsets),
                ..Default::default()
            },
        );
        let decoded = finish(
            fbb,
            wire::ResponseBody::DescribeGroupResponse,
            body.as_union_value(),
        );
        let ResponseBody::DescribeGroup(group) = decoded else {
            panic!("not a describe response");
        };
        assert_eq!(
            (group.group_id.as_str(), group.state.as_str()),
            ("g", "stable")
        );
        assert_eq!(group.members[0].member_id, "m-1");
        assert_eq!(group.members[0].last_heartbeat_ms_ago, 120);
        let (topic, partitions) = &group.offsets[0];
        assert_eq!(topic, "orders");
        assert_eq!(partitions[0].partition, 0, "sorted by partition");
        assert_eq!(partitions[0].offset, Some(17));
        assert_eq!(partitions[0].metadata.as_deref(), Some("meta"));
        assert_eq!(partitions[1].offset, None, "-1: nothing committed");
        assert_eq!(
            ResponseBody::DescribeGroup(group).group_status(),
            Some((Code::None, None, 0))
        );

        let mut fbb = FlatBufferBuilder::new();
        let message = fbb.create_string("not me");
        let body = wire::DeleteGroupResponse::create(
            &mut fbb,
            &wire::DeleteGroupResponseArgs {
                error: wire::ErrorCode::NotLeader,
                message: Some(message),
                leader_node: 3,
            },
        );
        let decoded = finish(
            fbb,
            wire::ResponseBody::DeleteGroupResponse,
            body.as_union_value(),
        );
        assert_eq!(
            decoded.group_status(),
            Some((Code::NotLeader, Some("not me"), 3))
        );

        let mut fbb = FlatBufferBuilder::new();
        let body = wire::InitProducerIdResponse::create(
            &mut fbb,
            &wire::InitProducerIdResponseArgs {
                producer_id: 1 << 50,
                producer_epoch: 2,
                ..Default::default()
            },
        );
        let decoded = finish(
            fbb,
            wire::ResponseBody::InitProducerIdResponse,
            body.as_union_value(),
        );
        let ResponseBody::InitProducerId(result) = decoded else {
            panic!("not an InitProducerId response");
        };
        assert_eq!((result.producer_id, result.producer_epoch), (1 << 50, 2));
    }
}
