//! End-to-end test of the async client against a minimal in-process mock broker
//! (one shard, in-memory log, idempotent produce, a one-group-at-a-time model
//! of the cooperative group protocol). The real broker's tests live in `tests/`.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use flatbuffers::FlatBufferBuilder;
use sluice_client::batch::BatchIter;
use sluice_client::frame::{encode_frame_head, FrameDecoder};
use sluice_client::{
    Acks, Client, ClientConfig, Consumer, ConsumerConfig, GroupConsumer, Producer, ProducerConfig,
    ProducerRecord, SeekTo,
};
use sluice_schema::{batch, wire};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PARTITIONS: u32 = 2;

type Log = Arc<Mutex<HashMap<u32, Vec<(u64, Bytes)>>>>;

/// One idempotent producer's state in one partition.
#[derive(Default)]
struct Sequences {
    next: i32,
    /// (base sequence, base offset) of its last IDEMPOTENT_BATCHES_IN_FLIGHT_MAX (16) batches.
    recent: VecDeque<(i32, u64)>,
}

type TopicPartition = (String, u32);

#[derive(Default)]
struct MockMember {
    epoch: i32,
    assigned: BTreeSet<TopicPartition>,
    revoking: BTreeSet<TopicPartition>,
}

#[derive(Default)]
struct MockGroup {
    epoch: i32,
    members: BTreeMap<String, MockMember>,
    offsets: BTreeMap<TopicPartition, u64>,
    joined: u32,
    /// Heartbeats answered.
    heartbeats: u32,
}

#[derive(Default)]
struct Mock {
    log: Log,
    /// Answer InitProducerId with UnknownRequestKind (an old broker).
    no_idempotence: bool,
    /// Append the next this many produce requests, then answer RequestTimedOut.
    lose_acks: AtomicU32,
    init_producer_ids: AtomicU32,
    sequences: Mutex<HashMap<(u32, i64), Sequences>>,
    /// (partition, producer id, base sequence, records) of every appended batch.
    stamps: Mutex<Vec<(u32, i64, i32, u32)>>,
    group: Mutex<MockGroup>,
    closed: AtomicBool,
}

async fn start_broker() -> String {
    start_mock(Mock::default()).await.0
}

async fn start_mock(mock: Mock) -> (String, Arc<Mock>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mock = Arc::new(mock);
    let shared = mock.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(serve(stream, shared.clone()));
        }
    });
    (addr, mock)
}

async fn serve(mut stream: TcpStream, mock: Arc<Mock>) {
    let mut decoder = FrameDecoder::default();
    loop {
        while let Some(frame) = decoder.next_frame().unwrap() {
            let request = flatbuffers::root::<wire::Request>(&frame.envelope).unwrap();
            let mut fbb = FlatBufferBuilder::new();
            if mock.closed.load(Ordering::Relaxed) {
                return;
            }
            let envelope_error = mock.no_idempotence
                && request.body_type() == wire::RequestBody::InitProducerIdRequest;
            let reply = if envelope_error {
                Some((wire::ResponseBody::NONE, None, Bytes::new()))
            } else {
                respond(&mut fbb, &request, &frame.payload, &mock)
                    .map(|(kind, body, payload)| (kind, Some(body), payload))
            };
            let Some((kind, body, payload)) = reply else {
                continue;
            };
            let error = if envelope_error {
                wire::ErrorCode::UnknownRequestKind
            } else {
                wire::ErrorCode::None
            };
            let response = wire::Response::create(
                &mut fbb,
                &wire::ResponseArgs {
                    correlation_id: request.correlation_id(),
                    error,
                    body_type: kind,
                    body,
                    ..Default::default()
                },
            );
            fbb.finish(response, None);
            let mut out = BytesMut::new();
            encode_frame_head(&mut out, fbb.finished_data(), payload.len()).unwrap();
            out.extend_from_slice(&payload);
            stream.write_all(&out).await.unwrap();
        }
        if stream.read_buf(decoder.buffer_mut()).await.unwrap_or(0) == 0 {
            return;
        }
    }
}

type Body = flatbuffers::WIPOffset<flatbuffers::UnionWIPOffset>;

fn respond(
    fbb: &mut FlatBufferBuilder<'static>,
    request: &wire::Request<'_>,
    payload: &Bytes,
    mock: &Mock,
) -> Option<(wire::ResponseBody, Body, Bytes)> {
    let log = &mock.log;
    let empty = Bytes::new();
    if request.body_as_handshake_request().is_some() {
        let args = wire::HandshakeResponseArgs {
            version: 1,
            node_id: 1,
            shard_count: 1,
            frame_bytes_max: 64 << 20,
            ..Default::default()
        };
        let body = wire::HandshakeResponse::create(fbb, &args).as_union_value();
        return Some((wire::ResponseBody::HandshakeResponse, body, empty));
    }
    if request.body_as_metadata_request().is_some() {
        let partitions: Vec<_> = (0..PARTITIONS)
            .map(|partition| {
                let args = wire::PartitionMetadataArgs {
                    partition,
                    leader_node: 1,
                    ..Default::default()
                };
                wire::PartitionMetadata::create(fbb, &args)
            })
            .collect();
        let partitions = fbb.create_vector(&partitions);
        let name = fbb.create_string("t");
        let topic = wire::TopicMetadata::create(
            fbb,
            &wire::TopicMetadataArgs {
                name: Some(name),
                partitions: Some(partitions),
                ..Default::default()
            },
        );
        let topics = fbb.create_vector(&[topic]);
        let args = wire::MetadataResponseArgs {
            topics: Some(topics),
            brokers: None,
            controller_node: 0,
            node_id: 1,
        };
        let body = wire::MetadataResponse::create(fbb, &args).as_union_value();
        return Some((wire::ResponseBody::MetadataResponse, body, empty));
    }
    if let Some(produce) = request.body_as_produce_request() {
        return produce_response(fbb, produce, payload, mock);
    }
    if request.body_as_init_producer_id_request().is_some() {
        let count = mock.init_producer_ids.fetch_add(1, Ordering::Relaxed);
        let args = wire::InitProducerIdResponseArgs {
            producer_id: 7000 + i64::from(count),
            producer_epoch: 0,
            ..Default::default()
        };
        let body = wire::InitProducerIdResponse::create(fbb, &args).as_union_value();
        return Some((wire::ResponseBody::InitProducerIdResponse, body, empty));
    }
    if let Some(reply) = group_response(fbb, request, mock) {
        return Some(reply);
    }
    if let Some(fetch) = request.body_as_fetch_request() {
        return Some(fetch_response(fbb, fetch, log));
    }
    if let Some(list) = request.body_as_list_offsets_request() {
        return Some(list_offsets_response(fbb, list, log));
    }
    panic!("unexpected request {:?}", request.body_type());
}

fn append(log: &Log, partition: u32, range: Bytes) -> u64 {
    let mut log = log.lock().unwrap();
    let batches = log.entry(partition).or_default();
    let base = batches
        .last()
        .map_or(0, |(offset, frame)| offset + count(frame));
    let mut next = base;
    for frame in BatchIter::new(range) {
        let frame = frame.unwrap().frame;
        let mut stamped = BytesMut::from(&frame[..]);
        stamped[batch::BASE_OFFSET_OFFSET..][..8].copy_from_slice(&next.to_le_bytes());
        let stamped = stamped.freeze();
        batches.push((next, stamped.clone()));
        next += count(&stamped);
    }
    base
}

fn count(frame: &Bytes) -> u64 {
    u64::from(u32::from_le_bytes(
        frame[batch::RECORD_COUNT_OFFSET..][..4].try_into().unwrap(),
    ))
}

fn high_watermark(log: &Log, partition: u32) -> u64 {
    let log = log.lock().unwrap();
    let batches = log.get(&partition);
    batches
        .and_then(|batches| batches.last())
        .map_or(0, |(offset, frame)| offset + count(frame))
}

/// Appends like the real broker does for idempotent batches: in sequence, a
/// duplicate of one of the last 16 answered with its original offset, a gap
/// refused.
fn append_checked(mock: &Mock, partition: u32, range: Bytes) -> Result<u64, wire::ErrorCode> {
    let mut first = None;
    for frame in BatchIter::new(range) {
        let frame = frame.unwrap().frame;
        let header = sluice_client::batch::BatchHeader::parse(&frame).unwrap();
        if header.producer_id < 0 {
            let base = append(&mock.log, partition, frame);
            first.get_or_insert(base);
            continue;
        }
        let mut sequences = mock.sequences.lock().unwrap();
        let state = sequences
            .entry((partition, header.producer_id))
            .or_default();
        if let Some((_, offset)) = state
            .recent
            .iter()
            .find(|(sequence, _)| *sequence == header.base_sequence)
        {
            first.get_or_insert(*offset);
            continue;
        }
        if header.base_sequence != state.next {
            return Err(wire::ErrorCode::OutOfOrderSequence);
        }
        let base = append(&mock.log, partition, frame);
        state.next = sluice_client::batch::next_sequence(header.base_sequence, header.record_count);
        state.recent.push_back((header.base_sequence, base));
        if state.recent.len() > sluice_client::IDEMPOTENT_BATCHES_IN_FLIGHT_MAX {
            state.recent.pop_front();
        }
        mock.stamps.lock().unwrap().push((
            partition,
            header.producer_id,
            header.base_sequence,
            header.record_count,
        ));
        first.get_or_insert(base);
    }
    Ok(first.unwrap_or(0))
}

fn produce_response(
    fbb: &mut FlatBufferBuilder<'static>,
    produce: wire::ProduceRequest<'_>,
    payload: &Bytes,
    mock: &Mock,
) -> Option<(wire::ResponseBody, Body, Bytes)> {
    let topic = produce.topics().unwrap().get(0);
    let mut results = Vec::new();
    let lose_ack = mock
        .lose_acks
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok();
    for partition in topic.partitions().unwrap() {
        let start = partition.payload_offset() as usize;
        let range = payload.slice(start..start + partition.payload_bytes() as usize);
        let (base_offset, error) = match append_checked(mock, partition.partition(), range) {
            Ok(_) if lose_ack => (0, wire::ErrorCode::RequestTimedOut),
            Ok(base_offset) => (base_offset, wire::ErrorCode::None),
            Err(error) => (0, error),
        };
        let args = wire::ProducePartitionResultArgs {
            partition: partition.partition(),
            base_offset,
            error,
            ..Default::default()
        };
        results.push(wire::ProducePartitionResult::create(fbb, &args));
    }
    if produce.acks() == 0 {
        return None;
    }
    let partitions = fbb.create_vector(&results);
    let name = fbb.create_string("t");
    let topic = wire::ProduceTopicResult::create(
        fbb,
        &wire::ProduceTopicResultArgs {
            name: Some(name),
            partitions: Some(partitions),
        },
    );
    let topics = fbb.create_vector(&[topic]);
    let body = wire::ProduceResponse::create(
        fbb,
        &wire::ProduceResponseArgs {
            topics: Some(topics),
        },
    );
    Some((
        wire::ResponseBody::ProduceResponse,
        body.as_union_value(),
        Bytes::new(),
    ))
}

fn fetch_response(
    fbb: &mut FlatBufferBuilder<'static>,
    fetch: wire::FetchRequest<'_>,
    log: &Log,
) -> (wire::ResponseBody, Body, Bytes) {
    let topic = fetch.topics().unwrap().get(0);
    let mut payload = BytesMut::new();
    let mut results = Vec::new();
    for partition in topic.partitions().unwrap() {
        let start = payload.len();
        let batches = log
            .lock()
            .unwrap()
            .get(&partition.partition())
            .cloned()
            .unwrap_or_default();
        for (offset, frame) in batches {
            // Like the real broker: the first batch may start before the offset.
            if offset + count(&frame) > partition.offset() && payload.len() - start < 100_000 {
                payload.extend_from_slice(&frame);
            }
        }
        let args = wire::FetchPartitionResultArgs {
            partition: partition.partition(),
            high_watermark: high_watermark(log, partition.partition()),
            payload_offset: start as u32,
            payload_bytes: (payload.len() - start) as u32,
            ..Default::default()
        };
        results.push(wire::FetchPartitionResult::create(fbb, &args));
    }
    let partitions = fbb.create_vector(&results);
    let name = fbb.create_string("t");
    let topic = wire::FetchTopicResult::create(
        fbb,
        &wire::FetchTopicResultArgs {
            name: Some(name),
            partitions: Some(partitions),
        },
    );
    let topics = fbb.create_vector(&[topic]);
    let body = wire::FetchResponse::create(
        fbb,
        &wire::FetchResponseArgs {
            topics: Some(topics),
        },
    );
    (
        wire::ResponseBody::FetchResponse,
        body.as_union_value(),
        payload.freeze(),
    )
}

fn list_offsets_response(
    fbb: &mut FlatBufferBuilder<'static>,
    list: wire::ListOffsetsRequest<'_>,
    log: &Log,
) -> (wire::ResponseBody, Body, Bytes) {
    let topic = list.topics().unwrap().get(0);
    let mut results = Vec::new();
    for partition in topic.partitions().unwrap() {
        let high_watermark = high_watermark(log, partition.partition());
        let offset = if partition.spec() == wire::OffsetSpec::Earliest {
            0
        } else {
            high_watermark
        };
        let args = wire::ListOffsetsPartitionResultArgs {
            partition: partition.partition(),
            offset,
            high_watermark,
            timestamp_ms: -1,
            ..Default::default()
        };
        results.push(wire::ListOffsetsPartitionResult::create(fbb, &args));
    }
    let partitions = fbb.create_vector(&results);
    let name = fbb.create_string("t");
    let topic = wire::ListOffsetsTopicResult::create(
        fbb,
        &wire::ListOffsetsTopicResultArgs {
            name: Some(name),
            partitions: Some(partitions),
        },
    );
    let topics = fbb.create_vector(&[topic]);
    let body = wire::ListOffsetsResponse::create(
        fbb,
        &wire::ListOffsetsResponseArgs {
            topics: Some(topics),
        },
    );
    (
        wire::ResponseBody::ListOffsetsResponse,
        body.as_union_value(),
        Bytes::new(),
    )
}

type MockError = (wire::ErrorCode, String);

fn pairs(
    list: flatbuffers::Vector<'_, flatbuffers::ForwardsUOffset<wire::TopicPartitions<'_>>>,
) -> BTreeSet<TopicPartition> {
    let mut set = BTreeSet::new();
    for entry in list {
        for partition in entry.partitions().into_iter().flatten() {
            set.insert((entry.topic().to_owned(), partition));
        }
    }
    set
}

/// Partitions of "t", spread round-robin over the members in id order.
fn target_of(group: &MockGroup, member_id: &str) -> BTreeSet<TopicPartition> {
    let index = group.members.keys().position(|id| id == member_id).unwrap();
    let members = group.members.len() as u32;
    (0..PARTITIONS)
        .filter(|partition| partition % members == index as u32)
        .map(|partition| ("t".to_owned(), partition))
        .collect()
}

fn mock_heartbeat(
    group: &mut MockGroup,
    request: wire::GroupHeartbeatRequest<'_>,
) -> Result<(String, i32, BTreeSet<TopicPartition>), MockError> {
    group.heartbeats += 1;
    let unknown = || {
        (
            wire::ErrorCode::UnknownMemberId,
            "no such member".to_owned(),
        )
    };
    let given = request.member_id().unwrap_or_default().to_owned();
    let member_id = match request.member_epoch() {
        0 => {
            assert!(request.subscribed_topics().is_some(), "a join subscribes");
            group.joined += 1;
            let id = format!("m-{}", group.joined);
            group.members.insert(id.clone(), MockMember::default());
            group.epoch += 1;
            id
        }
        -1 | -2 => {
            group.members.remove(&given).ok_or_else(unknown)?;
            group.epoch += 1;
            return Ok((given, request.member_epoch(), BTreeSet::new()));
        }
        epoch => {
            let member = group.members.get(&given).ok_or_else(unknown)?;
            if epoch > member.epoch {
                return Err((wire::ErrorCode::StaleMemberEpoch, "newer epoch".into()));
            }
            given
        }
    };
    if let Some(owned) = request.owned() {
        let owned = pairs(owned);
        let member = group.members.get_mut(&member_id).unwrap();
        if !member.revoking.is_empty() && member.revoking.is_disjoint(&owned) {
            let revoked = std::mem::take(&mut member.revoking);
            member.assigned.retain(|tp| !revoked.contains(tp));
        }
    }
    let target = target_of(group, &member_id);
    let owned_by_others: BTreeSet<TopicPartition> = group
        .members
        .iter()
        .filter(|(id, _)| **id != member_id)
        .flat_map(|(_, member)| member.assigned.iter().cloned())
        .collect();
    let epoch = group.epoch;
    let member = group.members.get_mut(&member_id).unwrap();
    if member.revoking.is_empty() {
        member.revoking = member.assigned.difference(&target).cloned().collect();
    }
    if member.revoking.is_empty() {
        let grant: Vec<TopicPartition> = target
            .difference(&member.assigned)
            .filter(|tp| !owned_by_others.contains(*tp))
            .cloned()
            .collect();
        member.assigned.extend(grant);
        member.epoch = epoch;
    }
    let assignment = member
        .assigned
        .difference(&member.revoking)
        .cloned()
        .collect();
    Ok((member_id, member.epoch, assignment))
}

fn mock_commit(
    group: &mut MockGroup,
    request: wire::OffsetCommitRequest<'_>,
) -> Result<(), MockError> {
    let mut offsets = Vec::new();
    for topic in request.topics().into_iter().flatten() {
        for partition in topic.partitions().into_iter().flatten() {
            offsets.push((
                (topic.name().to_owned(), partition.partition()),
                partition.offset(),
            ));
        }
    }
    let member_id = request.member_id().unwrap_or_default();
    let epoch = request.member_epoch();
    if member_id.is_empty() {
        if epoch != -1 {
            return Err((
                wire::ErrorCode::InvalidRequest,
                "epoch -1 without a member".into(),
            ));
        }
        if !group.members.is_empty() {
            return Err((
                wire::ErrorCode::GroupNotEmpty,
                "the group has members".into(),
            ));
        }
    } else {
        let member = group.members.get(member_id).ok_or((
            wire::ErrorCode::UnknownMemberId,
            "no such member".to_owned(),
        ))?;
        if epoch > member.epoch || epoch <= 0 {
            return Err((wire::ErrorCode::StaleMemberEpoch, format!("epoch {epoch}")));
        }
        if let Some((tp, _)) = offsets.iter().find(|(tp, _)| !member.assigned.contains(tp)) {
            return Err((wire::ErrorCode::PartitionNotAssigned, format!("{tp:?}")));
        }
    }
    group.offsets.extend(offsets);
    Ok(())
}

fn group_response(
    fbb: &mut FlatBufferBuilder<'static>,
    request: &wire::Request<'_>,
    mock: &Mock,
) -> Option<(wire::ResponseBody, Body, Bytes)> {
    let mut group = mock.group.lock().unwrap();
    if let Some(heartbeat) = request.body_as_group_heartbeat_request() {
        assert_eq!(heartbeat.group_id(), "g");
        let args = match mock_heartbeat(&mut group, heartbeat) {
            Ok((member_id, member_epoch, assignment)) => {
                let mut by_topic: BTreeMap<String, Vec<u32>> = BTreeMap::new();
                for (topic, partition) in assignment {
                    by_topic.entry(topic).or_default().push(partition);
                }
                let entries: Vec<_> = by_topic
                    .iter()
                    .map(|(topic, partitions)| {
                        let partitions = fbb.create_vector(partitions);
                        let topic = fbb.create_string(topic);
                        wire::TopicPartitions::create(
                            fbb,
                            &wire::TopicPartitionsArgs {
                                topic: Some(topic),
                                partitions: Some(partitions),
                            },
                        )
                    })
                    .collect();
                let assignment = fbb.create_vector(&entries);
                wire::GroupHeartbeatResponseArgs {
                    member_id: Some(fbb.create_string(&member_id)),
                    member_epoch,
                    heartbeat_interval_ms: 20,
                    assignment: Some(assignment),
                    ..Default::default()
                }
            }
            Err((error, message)) => wire::GroupHeartbeatResponseArgs {
                error,
                message: Some(fbb.create_string(&message)),
                ..Default::default()
            },
        };
        let body = wire::GroupHeartbeatResponse::create(fbb, &args).as_union_value();
        return Some((
            wire::ResponseBody::GroupHeartbeatResponse,
            body,
            Bytes::new(),
        ));
    }
    if let Some(commit) = request.body_as_offset_commit_request() {
        let args = match mock_commit(&mut group, commit) {
            Ok(()) => wire::OffsetCommitResponseArgs::default(),
            Err((error, message)) => wire::OffsetCommitResponseArgs {
                error,
                message: Some(fbb.create_string(&message)),
                ..Default::default()
            },
        };
        let body = wire::OffsetCommitResponse::create(fbb, &args).as_union_value();
        return Some((wire::ResponseBody::OffsetCommitResponse, body, Bytes::new()));
    }
    if let Some(fetch) = request.body_as_offset_fetch_request() {
        let mut wanted: Vec<TopicPartition> = match fetch.topics() {
            Some(list) => pairs(list).into_iter().collect(),
            None => group.offsets.keys().cloned().collect(),
        };
        wanted.sort();
        let mut by_topic: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for (topic, partition) in wanted {
            let offset = group
                .offsets
                .get(&(topic.clone(), partition))
                .map_or(-1, |offset| *offset as i64);
            let entry = wire::OffsetFetchPartition::create(
                fbb,
                &wire::OffsetFetchPartitionArgs {
                    partition,
                    offset,
                    ..Default::default()
                },
            );
            by_topic.entry(topic).or_default().push(entry);
        }
        let topics: Vec<_> = by_topic
            .into_iter()
            .map(|(topic, partitions)| {
                let partitions = fbb.create_vector(&partitions);
                let name = fbb.create_string(&topic);
                wire::OffsetFetchTopic::create(
                    fbb,
                    &wire::OffsetFetchTopicArgs {
                        name: Some(name),
                        partitions: Some(partitions),
                    },
                )
            })
            .collect();
        let topics = fbb.create_vector(&topics);
        let args = wire::OffsetFetchResponseArgs {
            topics: Some(topics),
            ..Default::default()
        };
        let body = wire::OffsetFetchResponse::create(fbb, &args).as_union_value();
        return Some((wire::ResponseBody::OffsetFetchResponse, body, Bytes::new()));
    }
    None
}

#[tokio::test]
async fn produce_then_consume_roundtrip() {
    let addr = start_broker().await;
    let client = Client::connect(ClientConfig::new([addr])).await.unwrap();
    let config = ProducerConfig {
        batch_bytes: 4096,
        ..ProducerConfig::default()
    };
    let producer = Producer::new(client.clone(), config);
    let mut deliveries = Vec::new();
    for index in 0..2000u32 {
        let record = ProducerRecord::new("t", format!("value-{index}"))
            .with_key(format!("key-{}", index % 7));
        deliveries.push(producer.send(record).await.unwrap());
    }
    let mut offsets: HashMap<u32, Vec<u64>> = HashMap::new();
    for delivery in deliveries {
        let metadata = delivery.await.unwrap();
        offsets
            .entry(metadata.partition)
            .or_default()
            .push(metadata.offset.unwrap());
    }
    for (_, mut list) in offsets.clone() {
        let expected: Vec<u64> = (0..list.len() as u64).collect();
        list.sort_unstable();
        assert_eq!(list, expected, "offsets are dense per partition");
    }
    producer.close().await.unwrap();

    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer.assign("t", &[]).await.unwrap();
    let mut seen = 0;
    while seen < 2000 {
        let record = consumer.recv().await.unwrap().unwrap();
        let key = String::from_utf8(record.key.unwrap().to_vec()).unwrap();
        let partition = sluice_client::partitioner::partition_for_key(key.as_bytes(), PARTITIONS);
        assert_eq!(partition, record.partition);
        seen += 1;
    }
    let total: u64 = (0..PARTITIONS)
        .map(|p| consumer.position("t", p).unwrap().unwrap())
        .sum();
    assert_eq!(total, 2000);

    consumer.seek("t", 0, SeekTo::Offset(5)).unwrap();
    let record = consumer.recv().await.unwrap().unwrap();
    assert_eq!((record.partition, record.offset), (0, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_zero_and_flush() {
    let addr = start_broker().await;
    let client = Client::connect(ClientConfig::new([addr])).await.unwrap();
    let config = ProducerConfig {
        acks: Acks::None,
        ..ProducerConfig::default()
    };
    let producer = Producer::new(client.clone(), config);
    for _ in 0..500 {
        producer
            .send_detached(ProducerRecord::new("t", "x").with_partition(1))
            .await
            .unwrap();
    }
    let last = producer
        .send(ProducerRecord::new("t", "y").with_partition(1))
        .await
        .unwrap();
    producer.flush().await.unwrap();
    assert_eq!(last.await.unwrap().offset, None);
    producer.close().await.unwrap();
    // acks=0 has no response: wait until the mock broker applied everything.
    for _ in 0..100 {
        let offset = client
            .list_offsets("t", 1, sluice_client::OffsetQuery::Latest)
            .await
            .unwrap();
        if offset.offset == 501 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("records of acks=0 did not arrive");
}

async fn produce_values(client: &Client, values: std::ops::Range<u32>) -> Vec<(u32, u64)> {
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    let mut deliveries = Vec::new();
    for index in values {
        let record = ProducerRecord::new("t", format!("{index}")).with_key(format!("k{index}"));
        deliveries.push(producer.send(record).await.unwrap());
    }
    let mut stored = Vec::new();
    for delivery in deliveries {
        let metadata = delivery.await.unwrap();
        stored.push((metadata.partition, metadata.offset.unwrap()));
    }
    producer.close().await.unwrap();
    stored
}

#[tokio::test]
async fn idempotent_retries_do_not_duplicate() {
    let (addr, mock) = start_mock(Mock::default()).await;
    let client = Client::connect(ClientConfig::new([addr])).await.unwrap();
    let config = ProducerConfig {
        batch_bytes: 1024,
        linger: Duration::from_millis(2),
        retry_backoff: Duration::from_millis(5),
        ..ProducerConfig::default()
    };
    let producer = Producer::new(client.clone(), config);
    // The first produce requests are appended, but their answers are lost.
    mock.lose_acks.store(4, Ordering::Relaxed);
    let mut deliveries = Vec::new();
    for index in 0..1500u32 {
        let record = ProducerRecord::new("t", format!("value-{index}"))
            .with_key(format!("key-{}", index % 11));
        deliveries.push(producer.send(record).await.unwrap());
    }
    let mut offsets: HashMap<u32, Vec<u64>> = HashMap::new();
    for delivery in deliveries {
        let metadata = delivery.await.unwrap();
        offsets
            .entry(metadata.partition)
            .or_default()
            .push(metadata.offset.unwrap());
    }
    producer.close().await.unwrap();
    assert_eq!(mock.lose_acks.load(Ordering::Relaxed), 0, "acks were lost");
    for (partition, mut list) in offsets {
        list.sort_unstable();
        let expected: Vec<u64> = (0..list.len() as u64).collect();
        assert_eq!(list, expected, "dense offsets in partition {partition}");
        assert_eq!(
            high_watermark(&mock.log, partition),
            list.len() as u64,
            "no duplicates appended to partition {partition}"
        );
    }
    assert_eq!(mock.init_producer_ids.load(Ordering::Relaxed), 1);
    let stamps = mock.stamps.lock().unwrap().clone();
    assert!(!stamps.is_empty());
    for partition in 0..PARTITIONS {
        let mut next = 0;
        for (_, producer_id, base_sequence, records) in
            stamps.iter().filter(|stamp| stamp.0 == partition)
        {
            assert_eq!(*producer_id, 7000);
            assert_eq!(*base_sequence, next, "contiguous sequences");
            next += *records as i32;
        }
    }
}

#[tokio::test]
async fn a_sequence_gap_is_reported_and_old_brokers_get_plain_batches() {
    let (addr, mock) = start_mock(Mock::default()).await;
    let client = Client::connect(ClientConfig::new([addr])).await.unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    let first = producer
        .send(ProducerRecord::new("t", "a").with_partition(0))
        .await
        .unwrap();
    assert_eq!(first.await.unwrap().offset, Some(0));
    // The broker expects a later sequence than the producer's next one.
    mock.sequences
        .lock()
        .unwrap()
        .get_mut(&(0, 7000))
        .unwrap()
        .next += 3;
    let second = producer
        .send(ProducerRecord::new("t", "b").with_partition(0))
        .await
        .unwrap();
    let error = second.await.unwrap_err();
    assert!(
        matches!(error, sluice_client::Error::OutOfOrderSequence { .. }),
        "{error}"
    );
    producer.close().await.unwrap();

    let (addr, mock) = start_mock(Mock {
        no_idempotence: true,
        ..Mock::default()
    })
    .await;
    let client = Client::connect(ClientConfig::new([addr])).await.unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    assert_eq!(producer.identity().await.unwrap(), None);
    let delivery = producer
        .send(ProducerRecord::new("t", "plain").with_partition(1))
        .await
        .unwrap();
    assert_eq!(delivery.await.unwrap().offset, Some(0));
    producer.close().await.unwrap();
    assert!(
        mock.stamps.lock().unwrap().is_empty(),
        "no idempotent batch"
    );
    assert_eq!(high_watermark(&mock.log, 1), 1);
}

type Seen = Arc<Mutex<Vec<(String, u32)>>>;

fn recorder() -> (Seen, impl FnMut(&[(String, u32)]) + Send + 'static) {
    let seen: Seen = Arc::default();
    let copy = seen.clone();
    (seen, move |partitions: &[(String, u32)]| {
        copy.lock().unwrap().extend_from_slice(partitions)
    })
}

fn tp(partition: u32) -> (String, u32) {
    ("t".to_owned(), partition)
}

async fn next_record(consumer: &mut GroupConsumer) -> sluice_client::ConsumerRecord {
    tokio::time::timeout(Duration::from_secs(10), consumer.recv())
        .await
        .expect("a record within 10 s")
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn group_consumer_commits_and_resumes() {
    let (addr, mock) = start_mock(Mock::default()).await;
    let client = Client::connect(ClientConfig::new([addr])).await.unwrap();
    produce_values(&client, 0..100).await;
    let (assigned, on_assigned) = recorder();
    let mut consumer = GroupConsumer::builder(client.clone())
        .group("g")
        .subscribe(["t"])
        .auto_commit(false)
        .on_assigned(on_assigned)
        .build()
        .await
        .unwrap();
    assert!(!consumer.member_id().is_empty());
    let mut seen = std::collections::HashSet::new();
    for _ in 0..100 {
        let record = next_record(&mut consumer).await;
        seen.insert((record.partition, record.offset));
    }
    assert_eq!(seen.len(), 100);
    assert_eq!(consumer.assignment(), vec![tp(0), tp(1)]);
    assert_eq!(*assigned.lock().unwrap(), vec![tp(0), tp(1)]);
    consumer.commit().await.unwrap();
    {
        let group = mock.group.lock().unwrap();
        for partition in 0..PARTITIONS {
            assert_eq!(
                group.offsets.get(&tp(partition)).copied(),
                Some(high_watermark(&mock.log, partition))
            );
        }
    }
    consumer.close().await.unwrap();
    assert!(mock.group.lock().unwrap().members.is_empty(), "left");

    produce_values(&client, 100..110).await;
    let mut again = GroupConsumer::builder(client.clone())
        .group("g")
        .subscribe(["t"])
        .build()
        .await
        .unwrap();
    for _ in 0..10 {
        let record = next_record(&mut again).await;
        let value: u32 = std::str::from_utf8(record.value.as_deref().unwrap())
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            value >= 100,
            "resumed at the committed offsets, got {value}"
        );
    }
    // Auto-commit commits at close.
    again.close().await.unwrap();
    let group = mock.group.lock().unwrap();
    let committed: u64 = group.offsets.values().sum();
    assert_eq!(committed, 110);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_member_gets_a_partition_once_the_first_revoked_it() {
    let (addr, mock) = start_mock(Mock::default()).await;
    let client = Client::connect(ClientConfig::new([addr])).await.unwrap();
    produce_values(&client, 0..40).await;
    let (revoked, on_revoked) = recorder();
    let mut first = GroupConsumer::builder(client.clone())
        .group("g")
        .subscribe(["t"])
        .on_revoked(on_revoked)
        .build()
        .await
        .unwrap();
    for _ in 0..40 {
        next_record(&mut first).await;
    }
    let (assigned, on_assigned) = recorder();
    let mut second = GroupConsumer::builder(client.clone())
        .group("g")
        .subscribe(["t"])
        .on_assigned(on_assigned)
        .build()
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while first.assignment().len() != 1 || second.assignment().len() != 1 {
        assert!(tokio::time::Instant::now() < deadline, "no rebalance");
        let _ = tokio::time::timeout(Duration::from_millis(20), first.recv()).await;
        let _ = tokio::time::timeout(Duration::from_millis(20), second.recv()).await;
    }
    let moved = second.assignment()[0].clone();
    assert_eq!(*revoked.lock().unwrap(), vec![moved.clone()]);
    assert_eq!(*assigned.lock().unwrap(), vec![moved.clone()]);
    assert_ne!(first.assignment()[0], moved);
    // Auto-commit mode: the revoked partition's position was committed first.
    let committed = mock.group.lock().unwrap().offsets.get(&moved).copied();
    assert_eq!(committed, Some(high_watermark(&mock.log, moved.1)));
    // New records of the moved partition go to the second member only.
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    for index in 0..5 {
        let record = ProducerRecord::new("t", format!("new-{index}")).with_partition(moved.1);
        producer.send(record).await.unwrap().await.unwrap();
    }
    producer.close().await.unwrap();
    for _ in 0..5 {
        let record = next_record(&mut second).await;
        assert_eq!(record.partition, moved.1);
        assert!(record.value.as_deref().unwrap().starts_with(b"new-"));
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), first.recv())
            .await
            .is_err(),
        "the first member has nothing new"
    );
    first.close().await.unwrap();
    second.close().await.unwrap();
    assert!(mock.group.lock().unwrap().members.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_member_drops_its_partitions_without_committing_and_rejoins() {
    let (addr, mock) = start_mock(Mock::default()).await;
    let client = Client::connect(ClientConfig::new([addr])).await.unwrap();
    produce_values(&client, 0..20).await;
    let (lost, on_lost) = recorder();
    let mut consumer = GroupConsumer::builder(client.clone())
        .group("g")
        .subscribe(["t"])
        .auto_commit(false)
        .on_lost(on_lost)
        .build()
        .await
        .unwrap();
    for _ in 0..5 {
        next_record(&mut consumer).await;
    }
    let old_member = consumer.member_id();
    // The broker expired the member (e.g. it was paused past its session).
    mock.group.lock().unwrap().members.clear();
    let error = consumer.commit().await.unwrap_err();
    assert!(error.is_fenced(), "{error}");
    assert!(
        mock.group.lock().unwrap().offsets.is_empty(),
        "nothing committed"
    );
    // It drops everything, rejoins, and reads again from the (uncommitted) start.
    let mut seen = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while seen < 20 {
        assert!(tokio::time::Instant::now() < deadline, "did not recover");
        if let Ok(Some(record)) =
            tokio::time::timeout(Duration::from_millis(50), consumer.recv()).await
        {
            record.unwrap();
            seen += 1;
        }
    }
    let mut lost = lost.lock().unwrap().clone();
    lost.sort();
    lost.dedup();
    assert_eq!(lost, vec![tp(0), tp(1)]);
    assert_ne!(consumer.member_id(), old_member);
    assert_eq!(consumer.assignment(), vec![tp(0), tp(1)]);
    consumer.commit().await.unwrap();
    consumer.close().await.unwrap();
}
