//! Produce and consume through the client library and the CLI against a real
//! broker process, with Kafka's per-partition semantics.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_client::{
    Acks, Client, ClientConfig, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord,
    SeekTo,
};
use sluice_tests::{runtime, Broker};

async fn client(broker: &Broker) -> Client {
    Client::connect(ClientConfig::new([broker.brokers()]))
        .await
        .unwrap()
}

#[test]
fn produce_and_consume_through_the_client_with_every_acks_mode() {
    let broker = Broker::start("client-roundtrip", &["--shards", "2"]);
    runtime().block_on(async {
        let client = client(&broker).await;
        client.create_topic("events", 3, vec![]).await.unwrap();
        let mut sent: HashMap<(u32, u64), (Option<Bytes>, Bytes)> = HashMap::new();
        for (acks, count) in [(Acks::Leader, 300u32), (Acks::All, 300), (Acks::None, 300)] {
            let producer = Producer::new(
                client.clone(),
                ProducerConfig {
                    acks,
                    ..ProducerConfig::default()
                },
            );
            let mut deliveries = Vec::new();
            for i in 0..count {
                let key = Bytes::from(format!("key-{}", i % 17));
                let value = Bytes::from(format!("{acks:?}-value-{i}"));
                let record = ProducerRecord::new("events", value.clone()).with_key(key.clone());
                deliveries.push((key, value, producer.send(record).await.unwrap()));
            }
            producer.flush().await.unwrap();
            for (key, value, delivery) in deliveries {
                let metadata = delivery.await.unwrap();
                match acks {
                    Acks::None => assert_eq!(metadata.offset, None, "acks=0 gets no offset"),
                    _ => {
                        sent.insert(
                            (metadata.partition, metadata.offset.unwrap()),
                            (Some(key), value),
                        );
                    }
                }
            }
            producer.close().await.unwrap();
        }
        // acks=0 records are appended too (fire and forget): 900 in all.
        let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
        consumer.assign("events", &[]).await.unwrap();
        let mut seen = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen < 900 && Instant::now() < deadline {
            let record = tokio::time::timeout(Duration::from_secs(10), consumer.recv())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if let Some((key, value)) = sent.get(&(record.partition, record.offset)) {
                assert_eq!(record.key.as_ref(), key.as_ref());
                assert_eq!(record.value.as_ref(), Some(value));
            }
            seen += 1;
        }
        assert_eq!(seen, 900);
    });
}

#[test]
fn the_seed_ordering_example_and_null_key_distribution() {
    let broker = Broker::start("ordering", &["--shards", "2"]);
    runtime().block_on(async {
        let client = client(&broker).await;
        client.create_topic("orders", 3, vec![]).await.unwrap();
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        let mut placed = Vec::new();
        for step in ["created", "paid", "shipped"] {
            let record = ProducerRecord::new("orders", step).with_key("order-100");
            placed.push(producer.send(record).await.unwrap().await.unwrap());
        }
        // Same key → same partition → consecutive offsets, in order.
        assert!(placed.iter().all(|m| m.partition == placed[0].partition));
        let offsets: Vec<u64> = placed.iter().map(|m| m.offset.unwrap()).collect();
        assert_eq!(offsets, vec![offsets[0], offsets[0] + 1, offsets[0] + 2]);
        // Null keys spread over every partition.
        client.create_topic("spread", 3, vec![]).await.unwrap();
        let round_robin = Producer::new(
            client.clone(),
            ProducerConfig {
                partitioner: sluice_client::NullKeyPolicy::RoundRobin,
                ..ProducerConfig::default()
            },
        );
        let mut per_partition = [0u32; 3];
        for i in 0..300 {
            let metadata = round_robin
                .send(ProducerRecord::new("spread", format!("v{i}")))
                .await
                .unwrap()
                .await
                .unwrap();
            per_partition[metadata.partition as usize] += 1;
        }
        assert!(per_partition.iter().all(|n| *n >= 50), "{per_partition:?}");
        // Consuming partition of order-100 returns the three steps in order.
        let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
        consumer
            .assign("orders", &[placed[0].partition])
            .await
            .unwrap();
        consumer
            .seek("orders", placed[0].partition, SeekTo::Offset(offsets[0]))
            .unwrap();
        let mut steps = Vec::new();
        while steps.len() < 3 {
            let record = consumer.recv().await.unwrap().unwrap();
            steps.push(String::from_utf8(record.value.unwrap().to_vec()).unwrap());
        }
        assert_eq!(steps, ["created", "paid", "shipped"]);
    });
}

#[test]
fn a_long_poll_fetch_wakes_when_data_arrives() {
    let broker = Broker::start("long-poll", &["--shards", "2"]);
    runtime().block_on(async {
        let client = client(&broker).await;
        client.create_topic("waits", 1, vec![]).await.unwrap();
        let mut consumer = Consumer::new(
            client.clone(),
            ConsumerConfig {
                max_wait: Duration::from_secs(20),
                ..ConsumerConfig::default()
            },
        );
        consumer.assign("waits", &[0]).await.unwrap();
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        let started = Instant::now();
        let produce = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            producer
                .send(ProducerRecord::new("waits", "wake up"))
                .await
                .unwrap()
                .await
                .unwrap();
        };
        let (record, ()) = tokio::join!(consumer.recv(), produce);
        let record = record.unwrap().unwrap();
        assert_eq!(record.value.unwrap(), "wake up");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(250),
            "the fetch waited for the record: {waited:?}"
        );
        assert!(
            waited < Duration::from_secs(10),
            "the fetch woke on the produce, not at max_wait: {waited:?}"
        );
    });
}

#[test]
fn the_cli_creates_produces_consumes_and_describes() {
    let broker = Broker::start("cli", &["--shards", "2"]);
    broker.cli_ok(
        &[
            "topic",
            "create",
            "user-events",
            "--partitions",
            "3",
            "--config",
            "retention.ms=3600000",
        ],
        None,
    );
    let list = broker.cli_ok(&["topic", "list"], None);
    assert!(list.contains("user-events"), "{list}");
    let dir = sluice_tests::scratch("cli-acks");
    let ack_log = dir.join("acks.log");
    let input = "user-1:signed-up\nuser-2:logged-in\nuser-1:clicked\n";
    broker.cli_ok(
        &[
            "produce",
            "user-events",
            "--key-separator",
            ":",
            "--acks",
            "all",
            "--ack-log",
            ack_log.to_str().unwrap(),
        ],
        Some(input),
    );
    let acks = std::fs::read_to_string(&ack_log).unwrap();
    assert_eq!(acks.lines().count(), 3, "{acks}");
    let consumed = broker.cli_ok(
        &[
            "consume",
            "user-events",
            "--exit-at-end",
            "--format",
            "%k=%v@%p/%o\\n",
        ],
        None,
    );
    let mut lines: Vec<&str> = consumed.lines().collect();
    lines.sort();
    assert_eq!(lines.len(), 3, "{consumed}");
    assert!(lines.iter().any(|l| l.starts_with("user-1=signed-up@")));
    // user-1's two records share a partition, in order.
    let user1: Vec<&str> = consumed
        .lines()
        .filter(|l| l.starts_with("user-1="))
        .collect();
    assert_eq!(user1.len(), 2);
    assert!(user1[0].contains("signed-up") && user1[1].contains("clicked"));
    let describe = broker.cli_ok(
        &["topic", "describe", "user-events", "--format", "json"],
        None,
    );
    assert!(describe.contains("3600000"), "{describe}");
    broker.cli_ok(&["topic", "delete", "user-events"], None);
    let missing = broker.cli(&["topic", "describe", "user-events"], None);
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.starts_with("error: "), "one readable line: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn restart_keeps_topics_and_data_and_provisioning_creates_the_seed_topics() {
    let dir = sluice_tests::scratch("restart");
    let provision = dir.join("topics.txt");
    std::fs::write(
        &provision,
        "user-events 3\norders 3\npayments 5\nnotifications 1\norder-processing.DLQ 3\n",
    )
    .unwrap();
    let broker = Broker::start_in(
        &dir.join("data"),
        sluice_tests::free_port(),
        &["--shards", "2", "--provision", provision.to_str().unwrap()],
    );
    let list = broker.cli_ok(&["topic", "list", "--format", "json"], None);
    for topic in [
        "user-events",
        "orders",
        "payments",
        "notifications",
        "order-processing.DLQ",
    ] {
        assert!(list.contains(topic), "{list}");
    }
    let input: String = (0..200).map(|i| format!("k{i}:v{i}\n")).collect();
    broker.cli_ok(
        &["produce", "payments", "--key-separator", ":"],
        Some(&input),
    );
    let before = broker.cli_ok(
        &[
            "consume",
            "payments",
            "--exit-at-end",
            "--format",
            "%p %o %k %v\\n",
        ],
        None,
    );
    let mut broker = broker.restart();
    let after = broker.cli_ok(
        &[
            "consume",
            "payments",
            "--exit-at-end",
            "--format",
            "%p %o %k %v\\n",
        ],
        None,
    );
    let (mut a, mut b): (Vec<&str>, Vec<&str>) =
        (before.lines().collect(), after.lines().collect());
    a.sort();
    b.sort();
    assert_eq!(a.len(), 200);
    assert_eq!(a, b);
    assert!(
        broker.terminate(),
        "SIGTERM shuts down cleanly:\n{}",
        broker.log_text()
    );
    assert!(broker.log_text().contains("shutting down"));
}

/// Keyless records piped into the CLI spread evenly over a topic's partitions
/// (uniform sticky partitioning, KIP-794): each partition within ±10% of an
/// even share, for a small and a large input.
#[test]
fn keyless_records_from_the_cli_spread_evenly_over_partitions() {
    let broker = Broker::start("null-key-spread", &["--shards", "2"]);
    for (topic, count) in [("events", 30_000u64), ("events-large", 300_000)] {
        broker.cli_ok(&["topic", "create", topic, "--partitions", "3"], None);
        let input: String = (1..=count).map(|i| format!("{i}\n")).collect();
        let started = Instant::now();
        broker.cli_ok(&["produce", topic, "--acks", "1"], Some(&input));
        let describe = broker.cli_ok(&["topic", "describe", topic, "--format", "json"], None);
        let json: serde_json::Value = serde_json::from_str(&describe).unwrap();
        let shares: Vec<u64> = json["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["high_watermark"].as_u64().unwrap())
            .collect();
        assert_eq!(shares.iter().sum::<u64>(), count, "{shares:?}");
        eprintln!("{topic}: {shares:?} in {:?}", started.elapsed());
        let even = count as f64 / 3.0;
        for share in &shares {
            let off = (*share as f64 - even).abs() / even;
            assert!(
                off <= 0.10,
                "{topic}: {count} keyless records split {shares:?}, one share {:.1}% off even",
                off * 100.0
            );
        }
    }
}

#[test]
fn producer_stats_count_requests_batches_and_failed_requests() {
    let mut broker = Broker::start("client-producer-stats", &["--shards", "1"]);
    runtime().block_on(async {
        let client = Client::connect(ClientConfig {
            request_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_millis(500),
            ..ClientConfig::new([broker.brokers()])
        })
        .await
        .unwrap();
        client.create_topic("stats", 1, vec![]).await.unwrap();
        let producer = Producer::new(
            client.clone(),
            ProducerConfig {
                acks: Acks::Leader,
                batch_bytes: 4 << 10,
                max_in_flight: 1,
                delivery_timeout: Duration::from_secs(2),
                ..ProducerConfig::default()
            },
        );
        let empty = producer.stats();
        assert_eq!(empty.request_latency.count(), 0);
        assert_eq!(empty.request_latency.quantile(0.99), Duration::ZERO);
        let records: Vec<ProducerRecord> = (0..2000)
            .map(|i| ProducerRecord::new("stats", Bytes::from(format!("value-{i:06}"))))
            .collect();
        let started = Instant::now();
        for delivery in producer.send_many(&records).await.unwrap() {
            delivery.await.unwrap();
        }
        let elapsed = started.elapsed();
        let stats = producer.stats();
        // 2,000 records of ~20 B in 4 KiB batches: several batches, each counted
        // once, carried by at least one request; nothing failed.
        let batches = stats.queue_time.count();
        assert!(batches >= 8, "{batches} batches");
        let requests = stats.request_latency.count();
        assert!(
            (1..=batches).contains(&requests),
            "{requests} requests for {batches} batches"
        );
        assert_eq!(stats.requests_failed, 0);
        let latency = &stats.request_latency;
        assert!(latency.quantile(0.5) <= latency.quantile(0.99));
        assert!(latency.quantile(0.99) <= latency.max());
        assert!(latency.max() > Duration::ZERO && latency.max() <= elapsed);
        assert!(latency.mean() <= latency.max());

        // With the broker gone, requests fail and are counted; the window since
        // the first snapshot holds only them.
        broker.kill9();
        let delivery = producer
            .send(ProducerRecord::new("stats", Bytes::from_static(b"lost")))
            .await
            .unwrap();
        assert!(delivery.await.is_err());
        let after = producer.stats();
        let window = after.since(&stats);
        assert!(window.requests_failed >= 1, "{window:?}");
        assert_eq!(window.requests_failed, after.requests_failed);
        assert_eq!(
            window.request_latency.count(),
            after.request_latency.count() - stats.request_latency.count()
        );
        let mut merged = stats.clone();
        merged.merge(&window);
        assert_eq!(
            merged.request_latency.count(),
            after.request_latency.count()
        );
        assert_eq!(merged.requests_failed, after.requests_failed);
    });
}

#[test]
fn send_many_queues_records_in_order_across_topics_and_checks_every_size_first() {
    let broker = Broker::start("client-send-many", &["--shards", "2"]);
    runtime().block_on(async {
        let client = client(&broker).await;
        client.create_topic("keyed", 3, vec![]).await.unwrap();
        client.create_topic("plain", 1, vec![]).await.unwrap();
        let producer = Producer::new(
            client.clone(),
            ProducerConfig {
                acks: Acks::All,
                // Small batches and buffer: one call spans many batches and
                // several buffer reservations.
                batch_bytes: 4 << 10,
                buffer_bytes: 64 << 10,
                ..ProducerConfig::default()
            },
        );
        // Topics interleaved in runs (neither known to the producer yet), keys,
        // an explicit partition, a record with its own timestamp.
        let mut records = Vec::new();
        for i in 0..3000u32 {
            let topic = if (i / 250) % 2 == 0 { "keyed" } else { "plain" };
            let mut record = ProducerRecord::new(topic, Bytes::from(format!("v{i}")));
            if topic == "keyed" {
                record = record.with_key(Bytes::from(format!("k{}", i % 7)));
            }
            if i == 17 {
                record = record.with_timestamp(1_234_567);
            }
            records.push(record);
        }
        let expected: Vec<(String, Option<Bytes>, Bytes)> = records
            .iter()
            .map(|r| (r.topic.to_string(), r.key.clone(), r.value.clone().unwrap()))
            .collect();
        let deliveries = producer.send_many(&records).await.unwrap();
        assert_eq!(deliveries.len(), 3000);
        let mut stored: HashMap<(String, u32, u64), usize> = HashMap::new();
        let mut last_offset: HashMap<(String, u32), u64> = HashMap::new();
        for (i, delivery) in deliveries.into_iter().enumerate() {
            let metadata = delivery.await.unwrap();
            let offset = metadata.offset.unwrap();
            let partition_key = (metadata.topic.to_string(), metadata.partition);
            assert_eq!(metadata.topic.as_ref(), expected[i].0);
            if i == 17 {
                assert_eq!(metadata.timestamp_ms, 1_234_567);
            }
            // Within a partition, offsets follow the order of the call.
            if let Some(previous) = last_offset.insert(partition_key.clone(), offset) {
                assert!(offset > previous, "record {i} stored before an earlier one");
            }
            stored.insert((partition_key.0, partition_key.1, offset), i);
        }
        // One record too large: the call fails and queues none of them.
        let too_large = vec![
            ProducerRecord::new("plain", Bytes::from_static(b"before")),
            ProducerRecord::new("plain", Bytes::from(vec![0u8; 128 << 10])),
        ];
        let error = producer.send_many(&too_large).await.unwrap_err();
        assert!(
            matches!(error, sluice_client::Error::RecordTooLarge { .. }),
            "{error}"
        );
        // No records: nothing to do.
        assert!(producer.send_many(&[]).await.unwrap().is_empty());
        // A record for a partition the topic does not have: the call fails there,
        // and the record before it is still queued and delivered.
        let unknown = vec![
            ProducerRecord::new("plain", Bytes::from_static(b"kept")),
            ProducerRecord::new("plain", Bytes::from_static(b"nowhere")).with_partition(u32::MAX),
        ];
        let error = producer.send_many(&unknown).await.unwrap_err();
        assert!(
            matches!(error, sluice_client::Error::UnknownPartition { .. }),
            "{error}"
        );
        // The detached form, then a flush.
        let tail: Vec<ProducerRecord> = (0..500)
            .map(|i| ProducerRecord::new("plain", Bytes::from(format!("tail{i}"))))
            .collect();
        producer.send_many_detached(&tail).await.unwrap();
        producer.flush().await.unwrap();
        producer.close().await.unwrap();

        // Read back: each delivery's position holds its record; "before" was
        // never stored; the tail follows in order.
        let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
        consumer.assign("keyed", &[]).await.unwrap();
        consumer.assign("plain", &[]).await.unwrap();
        let mut seen = 0;
        let mut tail = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen < 3501 && Instant::now() < deadline {
            let record = tokio::time::timeout(Duration::from_secs(10), consumer.recv())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            seen += 1;
            let value = record.value.clone().unwrap();
            assert_ne!(value.as_ref(), b"before", "a refused call queued a record");
            assert_ne!(value.as_ref(), b"nowhere");
            if value.as_ref() == b"kept" {
                continue;
            }
            if value.starts_with(b"tail") {
                tail.push(value);
                continue;
            }
            let i = stored[&(record.topic.to_string(), record.partition, record.offset)];
            assert_eq!(record.key, expected[i].1);
            assert_eq!(value, expected[i].2);
        }
        assert_eq!(seen, 3501, "the 3,000, the one kept and the 500 detached");
        let in_order: Vec<Bytes> = (0..500).map(|i| Bytes::from(format!("tail{i}"))).collect();
        assert_eq!(tail, in_order);
    });
}
