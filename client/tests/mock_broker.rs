//! End-to-end test of the async client against a minimal in-process mock broker
//! (one shard, in-memory log). The real broker's tests live in `tests/`.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use flatbuffers::FlatBufferBuilder;
use sluice_client::batch::BatchIter;
use sluice_client::frame::{encode_frame_head, FrameDecoder};
use sluice_client::{
    Acks, Client, ClientConfig, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord,
    SeekTo,
};
use sluice_schema::{batch, wire};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PARTITIONS: u32 = 2;

type Log = Arc<Mutex<HashMap<u32, Vec<(u64, Bytes)>>>>;

async fn start_broker() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let log: Log = Arc::default();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(serve(stream, log.clone()));
        }
    });
    addr
}

async fn serve(mut stream: TcpStream, log: Log) {
    let mut decoder = FrameDecoder::default();
    loop {
        while let Some(frame) = decoder.next_frame().unwrap() {
            let request = flatbuffers::root::<wire::Request>(&frame.envelope).unwrap();
            let mut fbb = FlatBufferBuilder::new();
            let Some((kind, body, payload)) = respond(&mut fbb, &request, &frame.payload, &log)
            else {
                continue;
            };
            let response = wire::Response::create(
                &mut fbb,
                &wire::ResponseArgs {
                    correlation_id: request.correlation_id(),
                    body_type: kind,
                    body: Some(body),
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
    log: &Log,
) -> Option<(wire::ResponseBody, Body, Bytes)> {
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
        return produce_response(fbb, produce, payload, log);
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

fn produce_response(
    fbb: &mut FlatBufferBuilder<'static>,
    produce: wire::ProduceRequest<'_>,
    payload: &Bytes,
    log: &Log,
) -> Option<(wire::ResponseBody, Body, Bytes)> {
    let topic = produce.topics().unwrap().get(0);
    let mut results = Vec::new();
    for partition in topic.partitions().unwrap() {
        let start = partition.payload_offset() as usize;
        let range = payload.slice(start..start + partition.payload_bytes() as usize);
        let base_offset = append(log, partition.partition(), range);
        let args = wire::ProducePartitionResultArgs {
            partition: partition.partition(),
            base_offset,
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
