//! Request builders: an owned [`RequestBody`] per request kind, encoded into a
//! flatbuffers `Request` envelope by [`encode_request`] and framed by
//! [`encode_request_frame`].

use bytes::BytesMut;
use flatbuffers::{FlatBufferBuilder, WIPOffset};
use sluice_schema::wire;

use crate::error::Result;
use crate::frame::encode_frame_head;

/// Where to look for an offset (ListOffsets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetQuery {
    /// The log start offset.
    Earliest,
    /// The high watermark (offset of the next record).
    Latest,
    /// The first offset whose batch max timestamp is >= this many ms.
    Timestamp(i64),
}

/// A topic to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTopic {
    /// Name.
    pub name: String,
    /// Partition count.
    pub partitions: u32,
    /// Config overrides (`key`, `value`).
    pub configs: Vec<(String, String)>,
    /// Replicas per partition; 0 asks for the cluster's default (min(3, nodes)).
    pub replication_factor: u16,
}

/// One partition's range of the produce payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducePartitionRange {
    /// Partition.
    pub partition: u32,
    /// Start of its batches in the payload.
    pub payload_offset: u32,
    /// Bytes of its batches.
    pub payload_bytes: u32,
}

/// One topic of a produce request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProduceTopicRanges {
    /// Topic.
    pub name: String,
    /// Its partitions.
    pub partitions: Vec<ProducePartitionRange>,
}

/// One partition to fetch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchPartitionSpec {
    /// Partition.
    pub partition: u32,
    /// First offset wanted.
    pub offset: u64,
    /// Per-partition byte budget.
    pub max_bytes: u32,
    /// No batch starting at or past this is returned (0: no bound).
    pub end_offset: u64,
    /// Only batches starting at or past `offset` (a fetch continuing another
    /// that returned the batch holding `offset`).
    pub whole_batches: bool,
}

/// One partition to look an offset up for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListOffsetsSpec {
    /// Partition.
    pub partition: u32,
    /// What to look up.
    pub query: OffsetQuery,
}

/// Partitions of one topic (group assignments, owned sets, offset lookups).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TopicPartitions {
    /// Topic.
    pub topic: String,
    /// Partitions.
    pub partitions: Vec<u32>,
}

impl TopicPartitions {
    /// Groups `(topic, partition)` pairs by topic (topics and partitions sorted,
    /// duplicates removed).
    pub fn group<'a, I>(pairs: I) -> Vec<TopicPartitions>
    where
        I: IntoIterator<Item = (&'a str, u32)>,
    {
        let mut by_topic: std::collections::BTreeMap<&str, std::collections::BTreeSet<u32>> =
            std::collections::BTreeMap::new();
        for (topic, partition) in pairs {
            by_topic.entry(topic).or_default().insert(partition);
        }
        by_topic
            .into_iter()
            .map(|(topic, partitions)| TopicPartitions {
                topic: topic.to_owned(),
                partitions: partitions.into_iter().collect(),
            })
            .collect()
    }

    /// The `(topic, partition)` pairs of a list.
    pub fn pairs(list: &[TopicPartitions]) -> impl Iterator<Item = (String, u32)> + '_ {
        list.iter().flat_map(|entry| {
            entry
                .partitions
                .iter()
                .map(move |partition| (entry.topic.clone(), *partition))
        })
    }
}

/// A consumer-group heartbeat: join (member epoch 0), stay (the current epoch)
/// or leave (-1; -2 for a static member coming back within its session).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupHeartbeatRequest {
    /// Group.
    pub group_id: String,
    /// Empty when joining for the first time.
    pub member_id: String,
    /// [`sluice_schema::groups::JOIN_EPOCH`], the current epoch, or a leave epoch.
    pub member_epoch: i32,
    /// Static membership id (`group.instance.id`).
    pub instance_id: Option<String>,
    /// 0: the broker's default.
    pub session_timeout_ms: u32,
    /// 0: the broker's default.
    pub rebalance_timeout_ms: u32,
    /// The subscription; `None` when unchanged (required when joining).
    pub subscribed_topics: Option<Vec<String>>,
    /// `"uniform"` or `"range"`, on join; `None`: the broker's default.
    pub assignor: Option<String>,
    /// What the member owns now; `None` when unchanged. `Some(vec![])` says it
    /// owns nothing (and is encoded as an empty list, not left out).
    pub owned: Option<Vec<TopicPartitions>>,
}

/// One partition's offset to commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetCommitSpec {
    /// Partition.
    pub partition: u32,
    /// The next offset to consume (last processed + 1).
    pub offset: u64,
    /// Free-form client metadata.
    pub metadata: Option<String>,
}

/// The body of a request, one variant per request kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestBody {
    /// Version negotiation; the first request on a connection.
    Handshake {
        /// Lowest version spoken.
        version_min: u16,
        /// Highest version spoken.
        version_max: u16,
        /// Free-form software name.
        client_software: Option<String>,
    },
    /// Topic/partition layout (empty = all topics).
    Metadata {
        /// Topics.
        topics: Vec<String>,
    },
    /// Create topics.
    CreateTopics {
        /// Topics.
        topics: Vec<NewTopic>,
        /// Validate only.
        validate_only: bool,
    },
    /// Delete topics.
    DeleteTopics {
        /// Names.
        names: Vec<String>,
    },
    /// List topic names and partition counts.
    ListTopics,
    /// Describe topics (empty = all).
    DescribeTopics {
        /// Names.
        names: Vec<String>,
    },
    /// Append batches (in the frame payload).
    Produce {
        /// 0, 1 or -1.
        acks: i8,
        /// Broker-side durability timeout.
        timeout_ms: u32,
        /// Payload ranges per topic/partition.
        topics: Vec<ProduceTopicRanges>,
    },
    /// Read batches.
    Fetch {
        /// Long-poll wait.
        max_wait_ms: u32,
        /// Bytes to wait for.
        min_bytes: u32,
        /// Whole-response budget.
        max_bytes: u32,
        /// Topics and partitions.
        topics: Vec<(String, Vec<FetchPartitionSpec>)>,
    },
    /// Look offsets up.
    ListOffsets {
        /// Topics and partitions.
        topics: Vec<(String, Vec<ListOffsetsSpec>)>,
    },
    /// Join, stay in or leave a consumer group.
    GroupHeartbeat(GroupHeartbeatRequest),
    /// Commit a group's offsets.
    OffsetCommit {
        /// Group.
        group_id: String,
        /// The member's id (empty for a group without members).
        member_id: String,
        /// The member's latest epoch (-1 with an empty member id).
        member_epoch: i32,
        /// Offsets per topic.
        topics: Vec<(String, Vec<OffsetCommitSpec>)>,
    },
    /// Read a group's committed offsets.
    OffsetFetch {
        /// Group.
        group_id: String,
        /// The partitions wanted; `None`: every committed offset of the group.
        topics: Option<Vec<TopicPartitions>>,
    },
    /// The groups the answering node coordinates.
    ListGroups,
    /// A group's state, members and offsets.
    DescribeGroup {
        /// Group.
        group_id: String,
    },
    /// Delete an empty group and its offsets.
    DeleteGroup {
        /// Group.
        group_id: String,
    },
    /// A producer id for idempotent produce.
    InitProducerId,
}

type Fbb<'a> = FlatBufferBuilder<'a>;
type Union = WIPOffset<flatbuffers::UnionWIPOffset>;

/// Encodes a `Request` envelope and returns its bytes (borrowed from `fbb`).
pub fn encode_request<'a>(
    fbb: &'a mut Fbb<'_>,
    correlation_id: u32,
    client_id: &str,
    body: &RequestBody,
) -> &'a [u8] {
    fbb.reset();
    let (body_type, body_offset) = encode_body(fbb, body);
    let client_id = fbb.create_string(client_id);
    let request = wire::Request::create(
        fbb,
        &wire::RequestArgs {
            correlation_id,
            version: 1,
            client_id: Some(client_id),
            body_type,
            body: Some(body_offset),
        },
    );
    fbb.finish(request, None);
    fbb.finished_data()
}

/// Encodes the frame head (lengths + envelope) of a request whose payload of
/// `payload_bytes` follows it on the wire.
pub fn encode_request_frame(
    dst: &mut BytesMut,
    fbb: &mut Fbb<'_>,
    correlation_id: u32,
    client_id: &str,
    body: &RequestBody,
    payload_bytes: usize,
) -> Result<()> {
    let envelope = encode_request(fbb, correlation_id, client_id, body);
    encode_frame_head(dst, envelope, payload_bytes)
}

fn encode_body(fbb: &mut Fbb<'_>, body: &RequestBody) -> (wire::RequestBody, Union) {
    match body {
        RequestBody::Handshake {
            version_min,
            version_max,
            client_software,
        } => {
            let software = client_software
                .as_deref()
                .map(|text| fbb.create_string(text));
            let args = wire::HandshakeRequestArgs {
                version_min: *version_min,
                version_max: *version_max,
                client_software: software,
            };
            let offset = wire::HandshakeRequest::create(fbb, &args);
            (wire::RequestBody::HandshakeRequest, offset.as_union_value())
        }
        RequestBody::Metadata { topics } => {
            let topics = string_vector(fbb, topics);
            let offset = wire::MetadataRequest::create(fbb, &wire::MetadataRequestArgs { topics });
            (wire::RequestBody::MetadataRequest, offset.as_union_value())
        }
        RequestBody::CreateTopics {
            topics,
            validate_only,
        } => encode_create(fbb, topics, *validate_only),
        RequestBody::DeleteTopics { names } => {
            let names = string_vector(fbb, names);
            let offset =
                wire::DeleteTopicsRequest::create(fbb, &wire::DeleteTopicsRequestArgs { names });
            (
                wire::RequestBody::DeleteTopicsRequest,
                offset.as_union_value(),
            )
        }
        RequestBody::ListTopics => {
            let offset = wire::ListTopicsRequest::create(fbb, &wire::ListTopicsRequestArgs {});
            (
                wire::RequestBody::ListTopicsRequest,
                offset.as_union_value(),
            )
        }
        RequestBody::DescribeTopics { names } => {
            let names = string_vector(fbb, names);
            let offset = wire::DescribeTopicsRequest::create(
                fbb,
                &wire::DescribeTopicsRequestArgs { names },
            );
            (
                wire::RequestBody::DescribeTopicsRequest,
                offset.as_union_value(),
            )
        }
        RequestBody::Produce {
            acks,
            timeout_ms,
            topics,
        } => encode_produce(fbb, *acks, *timeout_ms, topics),
        RequestBody::Fetch {
            max_wait_ms,
            min_bytes,
            max_bytes,
            topics,
        } => encode_fetch(fbb, (*max_wait_ms, *min_bytes, *max_bytes), topics),
        RequestBody::ListOffsets { topics } => encode_list_offsets(fbb, topics),
        RequestBody::GroupHeartbeat(heartbeat) => encode_heartbeat(fbb, heartbeat),
        RequestBody::OffsetCommit {
            group_id,
            member_id,
            member_epoch,
            topics,
        } => encode_offset_commit(fbb, group_id, member_id, *member_epoch, topics),
        RequestBody::OffsetFetch { group_id, topics } => {
            let topics = topics
                .as_deref()
                .map(|topics| topic_partitions_vector(fbb, topics));
            let group_id = fbb.create_string(group_id);
            let args = wire::OffsetFetchRequestArgs {
                group_id: Some(group_id),
                topics,
            };
            let offset = wire::OffsetFetchRequest::create(fbb, &args);
            (
                wire::RequestBody::OffsetFetchRequest,
                offset.as_union_value(),
            )
        }
        RequestBody::ListGroups => {
            let offset = wire::ListGroupsRequest::create(fbb, &wire::ListGroupsRequestArgs {});
            (
                wire::RequestBody::ListGroupsRequest,
                offset.as_union_value(),
            )
        }
        RequestBody::DescribeGroup { group_id } => {
            let group_id = fbb.create_string(group_id);
            let args = wire::DescribeGroupRequestArgs {
                group_id: Some(group_id),
            };
            let offset = wire::DescribeGroupRequest::create(fbb, &args);
            (
                wire::RequestBody::DescribeGroupRequest,
                offset.as_union_value(),
            )
        }
        RequestBody::DeleteGroup { group_id } => {
            let group_id = fbb.create_string(group_id);
            let args = wire::DeleteGroupRequestArgs {
                group_id: Some(group_id),
            };
            let offset = wire::DeleteGroupRequest::create(fbb, &args);
            (
                wire::RequestBody::DeleteGroupRequest,
                offset.as_union_value(),
            )
        }
        RequestBody::InitProducerId => {
            let offset =
                wire::InitProducerIdRequest::create(fbb, &wire::InitProducerIdRequestArgs {});
            (
                wire::RequestBody::InitProducerIdRequest,
                offset.as_union_value(),
            )
        }
    }
}

type TopicPartitionsVector<'a> =
    WIPOffset<flatbuffers::Vector<'a, flatbuffers::ForwardsUOffset<wire::TopicPartitions<'a>>>>;

/// Encodes a list of topic partitions; an empty list stays an (empty) vector.
fn topic_partitions_vector<'a>(
    fbb: &mut Fbb<'a>,
    topics: &[TopicPartitions],
) -> TopicPartitionsVector<'a> {
    let offsets: Vec<_> = topics
        .iter()
        .map(|entry| {
            let partitions = fbb.create_vector(&entry.partitions);
            let topic = fbb.create_string(&entry.topic);
            wire::TopicPartitions::create(
                fbb,
                &wire::TopicPartitionsArgs {
                    topic: Some(topic),
                    partitions: Some(partitions),
                },
            )
        })
        .collect();
    fbb.create_vector(&offsets)
}

fn encode_heartbeat(
    fbb: &mut Fbb<'_>,
    heartbeat: &GroupHeartbeatRequest,
) -> (wire::RequestBody, Union) {
    let owned = heartbeat
        .owned
        .as_deref()
        .map(|owned| topic_partitions_vector(fbb, owned));
    let subscribed_topics = heartbeat.subscribed_topics.as_deref().map(|topics| {
        let offsets: Vec<_> = topics
            .iter()
            .map(|topic| fbb.create_string(topic))
            .collect();
        fbb.create_vector(&offsets)
    });
    let assignor = heartbeat
        .assignor
        .as_deref()
        .map(|assignor| fbb.create_string(assignor));
    let instance_id = heartbeat
        .instance_id
        .as_deref()
        .map(|instance| fbb.create_string(instance));
    let member_id =
        (!heartbeat.member_id.is_empty()).then(|| fbb.create_string(&heartbeat.member_id));
    let group_id = fbb.create_string(&heartbeat.group_id);
    let args = wire::GroupHeartbeatRequestArgs {
        group_id: Some(group_id),
        member_id,
        member_epoch: heartbeat.member_epoch,
        instance_id,
        session_timeout_ms: heartbeat.session_timeout_ms,
        rebalance_timeout_ms: heartbeat.rebalance_timeout_ms,
        subscribed_topics,
        assignor,
        owned,
    };
    let offset = wire::GroupHeartbeatRequest::create(fbb, &args);
    (
        wire::RequestBody::GroupHeartbeatRequest,
        offset.as_union_value(),
    )
}

fn encode_offset_commit(
    fbb: &mut Fbb<'_>,
    group_id: &str,
    member_id: &str,
    member_epoch: i32,
    topics: &[(String, Vec<OffsetCommitSpec>)],
) -> (wire::RequestBody, Union) {
    let mut topic_offsets = Vec::with_capacity(topics.len());
    for (name, partitions) in topics {
        let partitions: Vec<_> = partitions
            .iter()
            .map(|spec| {
                let metadata = spec.metadata.as_deref().map(|text| fbb.create_string(text));
                let args = wire::OffsetCommitPartitionArgs {
                    partition: spec.partition,
                    offset: spec.offset,
                    metadata,
                };
                wire::OffsetCommitPartition::create(fbb, &args)
            })
            .collect();
        let partitions = fbb.create_vector(&partitions);
        let name = fbb.create_string(name);
        let args = wire::OffsetCommitTopicArgs {
            name: Some(name),
            partitions: Some(partitions),
        };
        topic_offsets.push(wire::OffsetCommitTopic::create(fbb, &args));
    }
    let topics = fbb.create_vector(&topic_offsets);
    let member_id = (!member_id.is_empty()).then(|| fbb.create_string(member_id));
    let group_id = fbb.create_string(group_id);
    let args = wire::OffsetCommitRequestArgs {
        group_id: Some(group_id),
        member_id,
        member_epoch,
        topics: Some(topics),
    };
    let offset = wire::OffsetCommitRequest::create(fbb, &args);
    (
        wire::RequestBody::OffsetCommitRequest,
        offset.as_union_value(),
    )
}

fn string_vector<'a>(
    fbb: &mut Fbb<'a>,
    strings: &[String],
) -> Option<WIPOffset<flatbuffers::Vector<'a, flatbuffers::ForwardsUOffset<&'a str>>>> {
    if strings.is_empty() {
        return None;
    }
    let offsets: Vec<_> = strings.iter().map(|text| fbb.create_string(text)).collect();
    Some(fbb.create_vector(&offsets))
}

fn encode_create(
    fbb: &mut Fbb<'_>,
    topics: &[NewTopic],
    validate_only: bool,
) -> (wire::RequestBody, Union) {
    let mut topic_offsets = Vec::with_capacity(topics.len());
    for topic in topics {
        let configs: Vec<_> = topic
            .configs
            .iter()
            .map(|(key, value)| {
                let key = fbb.create_string(key);
                let value = fbb.create_string(value);
                wire::ConfigEntry::create(
                    fbb,
                    &wire::ConfigEntryArgs {
                        key: Some(key),
                        value: Some(value),
                    },
                )
            })
            .collect();
        let configs = fbb.create_vector(&configs);
        let name = fbb.create_string(&topic.name);
        let args = wire::NewTopicArgs {
            name: Some(name),
            partitions: topic.partitions,
            configs: Some(configs),
            replication_factor: topic.replication_factor,
        };
        topic_offsets.push(wire::NewTopic::create(fbb, &args));
    }
    let topics = fbb.create_vector(&topic_offsets);
    let args = wire::CreateTopicsRequestArgs {
        topics: Some(topics),
        validate_only,
    };
    let offset = wire::CreateTopicsRequest::create(fbb, &args);
    (
        wire::RequestBody::CreateTopicsRequest,
        offset.as_union_value(),
    )
}

fn encode_produce(
    fbb: &mut Fbb<'_>,
    acks: i8,
    timeout_ms: u32,
    topics: &[ProduceTopicRanges],
) -> (wire::RequestBody, Union) {
    let mut topic_offsets = Vec::with_capacity(topics.len());
    for topic in topics {
        let partitions: Vec<_> = topic
            .partitions
            .iter()
            .map(|range| {
                let args = wire::ProducePartitionArgs {
                    partition: range.partition,
                    payload_offset: range.payload_offset,
                    payload_bytes: range.payload_bytes,
                };
                wire::ProducePartition::create(fbb, &args)
            })
            .collect();
        let partitions = fbb.create_vector(&partitions);
        let name = fbb.create_string(&topic.name);
        let args = wire::ProduceTopicArgs {
            name: Some(name),
            partitions: Some(partitions),
        };
        topic_offsets.push(wire::ProduceTopic::create(fbb, &args));
    }
    let topics = fbb.create_vector(&topic_offsets);
    let args = wire::ProduceRequestArgs {
        acks,
        timeout_ms,
        topics: Some(topics),
    };
    let offset = wire::ProduceRequest::create(fbb, &args);
    (wire::RequestBody::ProduceRequest, offset.as_union_value())
}

fn encode_fetch(
    fbb: &mut Fbb<'_>,
    (max_wait_ms, min_bytes, max_bytes): (u32, u32, u32),
    topics: &[(String, Vec<FetchPartitionSpec>)],
) -> (wire::RequestBody, Union) {
    let mut topic_offsets = Vec::with_capacity(topics.len());
    for (name, partitions) in topics {
        let partitions: Vec<_> = partitions
            .iter()
            .map(|spec| {
                let args = wire::FetchPartitionArgs {
                    partition: spec.partition,
                    offset: spec.offset,
                    max_bytes: spec.max_bytes,
                    end_offset: spec.end_offset,
                    whole_batches: spec.whole_batches,
                };
                wire::FetchPartition::create(fbb, &args)
            })
            .collect();
        let partitions = fbb.create_vector(&partitions);
        let name = fbb.create_string(name);
        let args = wire::FetchTopicArgs {
            name: Some(name),
            partitions: Some(partitions),
        };
        topic_offsets.push(wire::FetchTopic::create(fbb, &args));
    }
    let topics = fbb.create_vector(&topic_offsets);
    let args = wire::FetchRequestArgs {
        max_wait_ms,
        min_bytes,
        max_bytes,
        topics: Some(topics),
    };
    let offset = wire::FetchRequest::create(fbb, &args);
    (wire::RequestBody::FetchRequest, offset.as_union_value())
}

fn encode_list_offsets(
    fbb: &mut Fbb<'_>,
    topics: &[(String, Vec<ListOffsetsSpec>)],
) -> (wire::RequestBody, Union) {
    let mut topic_offsets = Vec::with_capacity(topics.len());
    for (name, partitions) in topics {
        let partitions: Vec<_> = partitions
            .iter()
            .map(|spec| {
                let (spec_wire, timestamp_ms) = match spec.query {
                    OffsetQuery::Earliest => (wire::OffsetSpec::Earliest, 0),
                    OffsetQuery::Latest => (wire::OffsetSpec::Latest, 0),
                    OffsetQuery::Timestamp(ms) => (wire::OffsetSpec::Timestamp, ms),
                };
                let args = wire::ListOffsetsPartitionArgs {
                    partition: spec.partition,
                    spec: spec_wire,
                    timestamp_ms,
                };
                wire::ListOffsetsPartition::create(fbb, &args)
            })
            .collect();
        let partitions = fbb.create_vector(&partitions);
        let name = fbb.create_string(name);
        let args = wire::ListOffsetsTopicArgs {
            name: Some(name),
            partitions: Some(partitions),
        };
        topic_offsets.push(wire::ListOffsetsTopic::create(fbb, &args));
    }
    let topics = fbb.create_vector(&topic_offsets);
    let offset = wire::ListOffsetsRequest::create(
        fbb,
        &wire::ListOffsetsRequestArgs {
            topics: Some(topics),
        },
    );
    (
        wire::RequestBody::ListOffsetsRequest,
        offset.as_union_value(),
    )
}
