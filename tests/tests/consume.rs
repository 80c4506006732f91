//! Reading ahead: fetch ranges (`end_offset`, `whole_batches`) on the wire, and
//! a consumer that reads a partition it is behind on as a pipeline of pieces,
//! against a real broker process.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_client::batch::BatchIter;
use sluice_client::request::{FetchPartitionSpec, RequestBody};
use sluice_client::{
    Client, ClientConfig, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord,
    SeekTo,
};
use sluice_schema::wire::ErrorCode;
use sluice_tests::proto::{batch, create, first_fetch_result, produce};
use sluice_tests::{runtime, Broker, Raw};

/// Fetches one partition within a range; returns (error, the base offset and
/// record count of every batch returned).
fn fetch_range(
    raw: &mut Raw,
    topic: &str,
    offset: u64,
    end_offset: u64,
    whole_batches: bool,
    max_bytes: u32,
) -> (ErrorCode, Vec<(u64, u32)>) {
    fetch_range_waiting(
        raw,
        topic,
        (offset, end_offset),
        whole_batches,
        max_bytes,
        0,
    )
}

/// `fetch_range` with a long-poll of `max_wait_ms` for at least one byte.
fn fetch_range_waiting(
    raw: &mut Raw,
    topic: &str,
    (offset, end_offset): (u64, u64),
    whole_batches: bool,
    max_bytes: u32,
    max_wait_ms: u32,
) -> (ErrorCode, Vec<(u64, u32)>) {
    let body = RequestBody::Fetch {
        max_wait_ms,
        min_bytes: u32::from(max_wait_ms > 0),
        max_bytes: 16 << 20,
        topics: vec![(
            topic.into(),
            vec![FetchPartitionSpec {
                partition: 0,
                offset,
                max_bytes,
                end_offset,
                whole_batches,
            }],
        )],
    };
    let reply = raw.request(&body, &[]).unwrap();
    let response = reply.response();
    assert_eq!(response.error(), ErrorCode::None);
    let result = first_fetch_result(&response);
    let start = result.payload_offset() as usize;
    let bytes = result.payload_bytes() as usize;
    let payload = Bytes::copy_from_slice(&reply.payload[start..start + bytes]);
    let batches = BatchIter::new(payload)
        .map(|batch| {
            let batch = batch.unwrap();
            (batch.header.base_offset, batch.header.record_count)
        })
        .collect();
    (result.error(), batches)
}

#[test]
fn a_fetch_range_returns_the_batches_that_start_inside_it() {
    // From the tail cache, and with no cache: from disk.
    fetch_ranges("fetch-range-cached", &[]);
    fetch_ranges("fetch-range-disk", &["--tail-cache-mib", "0"]);
}

fn fetch_ranges(name: &str, args: &[&str]) {
    let broker = Broker::start(name, args);
    let mut raw = Raw::open(broker.addr);
    assert_eq!(create(&mut raw, "ranges", 1, &[]), ErrorCode::None);
    // Ten batches of ten records: bases 0, 10, ..., 90.
    for round in 0..10 {
        let values: Vec<String> = (0..10).map(|i| format!("r{round}-{i}")).collect();
        let values: Vec<&[u8]> = values.iter().map(|v| v.as_bytes()).collect();
        let (error, base, message) = produce(&mut raw, "ranges", 0, &batch(&values), 1);
        assert_eq!(error, ErrorCode::None, "{message}");
        assert_eq!(base, round * 10);
    }
    let bases = |batches: &[(u64, u32)]| batches.iter().map(|b| b.0).collect::<Vec<_>>();
    let max = 1 << 20;

    // Unbounded: from the batch holding the offset to the high watermark.
    let (error, got) = fetch_range(&mut raw, "ranges", 15, 0, false, max);
    assert_eq!(error, ErrorCode::None);
    assert_eq!(bases(&got), [10, 20, 30, 40, 50, 60, 70, 80, 90]);
    // An end: no batch that starts at or past it (the last one may reach past).
    let (_, got) = fetch_range(&mut raw, "ranges", 15, 35, false, max);
    assert_eq!(bases(&got), [10, 20, 30]);
    let (_, got) = fetch_range(&mut raw, "ranges", 15, 30, false, max);
    assert_eq!(bases(&got), [10, 20]);
    // whole_batches: the batch holding the offset is the previous piece's.
    let (_, got) = fetch_range(&mut raw, "ranges", 35, 65, true, max);
    assert_eq!(bases(&got), [40, 50, 60]);
    let (_, got) = fetch_range(&mut raw, "ranges", 40, 65, true, max);
    assert_eq!(bases(&got), [40, 50, 60]);
    // Pieces cut anywhere join without a gap or an overlap.
    let cuts = [0u64, 7, 23, 24, 51, 99, 100];
    let mut joined = Vec::new();
    for (i, pair) in cuts.windows(2).enumerate() {
        let (error, got) = fetch_range(&mut raw, "ranges", pair[0], pair[1], i > 0, max);
        assert_eq!(error, ErrorCode::None);
        joined.extend(bases(&got));
    }
    assert_eq!(joined, [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]);
    // A piece entirely inside the batch before it returns nothing, and at
    // once even from a long-poll: nothing it could wait for will come.
    let asked = Instant::now();
    let (error, got) = fetch_range_waiting(&mut raw, "ranges", (41, 45), true, max, 20_000);
    assert_eq!(error, ErrorCode::None);
    assert!(got.is_empty(), "{got:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    // A range reaching past the high watermark still long-polls for it.
    let asked = Instant::now();
    let (_, got) = fetch_range_waiting(&mut raw, "ranges", (100, 200), true, max, 300);
    assert!(got.is_empty());
    assert!(
        asked.elapsed() >= Duration::from_millis(250),
        "{:?}",
        asked.elapsed()
    );
    // Past the high watermark: only what is there.
    let (_, got) = fetch_range(&mut raw, "ranges", 85, 1_000, true, max);
    assert_eq!(bases(&got), [90]);
    // The byte budget still applies (at least one batch).
    let (_, got) = fetch_range(&mut raw, "ranges", 0, 100, false, 1);
    assert_eq!(bases(&got), [0]);
    // An end not past the offset is a typed error, not an empty answer.
    for end in [15, 3] {
        let (error, got) = fetch_range(&mut raw, "ranges", 15, end, false, max);
        assert_eq!(error, ErrorCode::InvalidRequest, "end {end}");
        assert!(got.is_empty());
    }
    // The largest end is no bound at all.
    let (error, got) = fetch_range(&mut raw, "ranges", 15, u64::MAX, true, max);
    assert_eq!(error, ErrorCode::None);
    assert_eq!(bases(&got), [20, 30, 40, 50, 60, 70, 80, 90]);
    // Offsets outside the log are out of range, with or without a range.
    for (offset, end) in [(101, 0), (101, 200), (u64::MAX - 1, u64::MAX)] {
        for whole in [false, true] {
            let (error, got) = fetch_range(&mut raw, "ranges", offset, end, whole, max);
            assert_eq!(error, ErrorCode::OffsetOutOfRange, "{offset}..{end}");
            assert!(got.is_empty());
        }
    }
    // The same partition twice in one fetch is refused as before.
    let spec = FetchPartitionSpec {
        partition: 0,
        offset: 0,
        max_bytes: max,
        end_offset: 50,
        whole_batches: false,
    };
    let body = RequestBody::Fetch {
        max_wait_ms: 0,
        min_bytes: 0,
        max_bytes: 16 << 20,
        topics: vec![(
            "ranges".into(),
            vec![
                spec,
                FetchPartitionSpec {
                    offset: 50,
                    end_offset: 0,
                    whole_batches: true,
                    ..spec
                },
            ],
        )],
    };
    let reply = raw.request(&body, &[]).unwrap();
    assert_eq!(reply.response().error(), ErrorCode::InvalidRequest);
    // The broker still answers normally afterwards.
    let (error, got) = fetch_range(&mut raw, "ranges", 0, 0, false, max);
    assert_eq!(error, ErrorCode::None);
    assert_eq!(got.len(), 10);
}

/// Consumes `count` records of one partition from the beginning; returns
/// their (offset, value) and the consumer's stats.
async fn consume_all(
    client: &Client,
    topic: &str,
    count: usize,
    config: ConsumerConfig,
) -> (Vec<(u64, Bytes)>, sluice_client::ConsumerStats) {
    let mut consumer = Consumer::new(client.clone(), config);
    consumer.assign(topic, &[0]).await.unwrap();
    let mut got = Vec::with_capacity(count);
    while got.len() < count {
        let record = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("the consumer stalled")
            .unwrap()
            .unwrap();
        got.push((record.offset, record.value.unwrap()));
    }
    (got, consumer.stats())
}

#[test]
fn a_consumer_reads_ahead_in_pieces_and_gets_every_record_once_in_order() {
    let broker = Broker::start("read-ahead", &[]);
    runtime().block_on(async {
        let client = Client::connect(ClientConfig::new([broker.brokers()]))
            .await
            .unwrap();
        client.create_topic("ahead", 1, vec![]).await.unwrap();
        // Batches of very different sizes, so that pieces sized from the
        // average sometimes come back short (their byte budget cuts them) and
        // the pieces after them must be dropped and read again.
        let mut sent: Vec<Bytes> = Vec::new();
        let size_of = |i: usize| match (i / 50) % 4 {
            0 => 100,
            1 => 3_000,
            2 => 20,
            _ => 12_000,
        };
        for round in 0..8 {
            let producer = Producer::new(
                client.clone(),
                ProducerConfig {
                    batch_bytes: [1 << 10, 16 << 10, 256 << 10][round % 3],
                    linger: Duration::from_millis(2),
                    ..ProducerConfig::default()
                },
            );
            for _ in 0..1_500 {
                let i = sent.len();
                let value = Bytes::from(format!("{i:08}-{}", "x".repeat(size_of(i))));
                sent.push(value.clone());
                producer
                    .send_detached(ProducerRecord::new("ahead", value).with_partition(0))
                    .await
                    .unwrap();
            }
            producer.flush().await.unwrap();
        }
        let want: Vec<(u64, Bytes)> = sent
            .iter()
            .enumerate()
            .map(|(i, v)| (i as u64, v.clone()))
            .collect();

        let pipelined = ConsumerConfig {
            partition_max_bytes: 64 << 10,
            fetches_in_flight: 4,
            ..ConsumerConfig::default()
        };
        let (got, stats) = consume_all(&client, "ahead", sent.len(), pipelined.clone()).await;
        assert!(got == want, "the records read back differ from those sent");
        eprintln!("pipelined: {stats:?}");
        assert!(
            stats.pieces > 10,
            "the partition was read in pieces: {stats:?}"
        );
        assert!(
            stats.in_flight_max >= 2,
            "more than one fetch in flight: {stats:?}"
        );
        assert!(
            stats.pieces_dropped > 0,
            "some pieces came back short and were read again: {stats:?}"
        );

        // One fetch at a time reads the same; 0 counts as 1.
        for fetches_in_flight in [1, 0] {
            let single = ConsumerConfig {
                fetches_in_flight,
                ..pipelined.clone()
            };
            let (got, stats) = consume_all(&client, "ahead", sent.len(), single).await;
            assert!(got == want, "fetches_in_flight {fetches_in_flight}");
            assert_eq!(stats.pieces, 0, "{stats:?}");
            assert_eq!(stats.in_flight_max, 1, "{stats:?}");
        }

        // A seek while pieces are in flight: nothing of the old position comes
        // back after it.
        let mut consumer = Consumer::new(client.clone(), pipelined);
        consumer.assign("ahead", &[0]).await.unwrap();
        for expected in 0..2_000u64 {
            let record = consumer.recv().await.unwrap().unwrap();
            assert_eq!(record.offset, expected);
        }
        consumer.seek("ahead", 0, SeekTo::Offset(5_000)).unwrap();
        for expected in 5_000..(sent.len() as u64) {
            let record = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
                .await
                .expect("the consumer stalled")
                .unwrap()
                .unwrap();
            assert_eq!(record.offset, expected);
            assert_eq!(record.value.unwrap(), sent[expected as usize]);
        }
        consumer.seek("ahead", 0, SeekTo::Beginning).unwrap();
        let record = consumer.recv().await.unwrap().unwrap();
        assert_eq!(record.offset, 0);
    });
}
