//! Every bad input gets its typed error (or, for broken framing, a closed
//! connection), appends nothing, and leaves the broker and other connections fine.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use sluice_client::request::{ProducePartitionRange, ProduceTopicRanges, RequestBody};
use sluice_schema::wire::{self, ErrorCode};
use sluice_tests::proto::*;
use sluice_tests::{Broker, Raw};

#[test]
fn bad_requests_get_typed_errors_and_append_nothing() {
    let broker = Broker::start("bad-requests", &["--shards", "2"]);
    let mut raw = Raw::open(broker.addr);
    assert_eq!(
        create(&mut raw, "t", 2, &[("max.message.bytes", "2000")]),
        ErrorCode::None
    );
    assert_eq!(create(&mut raw, "t", 2, &[]), ErrorCode::TopicAlreadyExists);
    assert_eq!(
        create(&mut raw, "bad/name", 1, &[]),
        ErrorCode::InvalidTopicName
    );
    assert_eq!(
        create(&mut raw, "zero", 0, &[]),
        ErrorCode::InvalidPartitionCount
    );
    assert_eq!(
        create(&mut raw, "conf", 1, &[("retention.ms", "soon")]),
        ErrorCode::InvalidConfig
    );
    assert_eq!(
        create(&mut raw, "conf", 1, &[("no.such.key", "1")]),
        ErrorCode::InvalidConfig
    );

    let good = batch(&[b"a", b"b"]);
    assert_eq!(produce(&mut raw, "t", 0, &good, 1).0, ErrorCode::None);
    assert_eq!(high_watermark(&mut raw, "t", 0), 2);

    assert_eq!(
        produce(&mut raw, "missing", 0, &good, 1).0,
        ErrorCode::UnknownTopic
    );
    assert_eq!(
        produce(&mut raw, "t", 9, &good, 1).0,
        ErrorCode::UnknownPartition
    );
    // A flipped byte in the records: the payload CRC fails.
    let mut corrupt = good.to_vec();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0x40;
    let (error, _, message) = produce(&mut raw, "t", 0, &corrupt, 1);
    assert_eq!(error, ErrorCode::CorruptBatch, "{message}");
    // Garbage where a batch should be.
    assert_eq!(
        produce(&mut raw, "t", 0, &[7u8; 200], 1).0,
        ErrorCode::InvalidBatch
    );
    // A good batch followed by a truncated one: all or nothing for the partition.
    let mut partial = good.to_vec();
    partial.extend_from_slice(&good[..40]);
    assert_eq!(
        produce(&mut raw, "t", 0, &partial, 1).0,
        ErrorCode::InvalidBatch
    );
    // Over max.message.bytes (2000 for this topic).
    let big = batch(&[&[1u8; 3000]]);
    let (error, _, message) = produce(&mut raw, "t", 0, &big, 1);
    assert_eq!(error, ErrorCode::RecordTooLarge, "{message}");
    assert!(message.contains("max.message.bytes"), "{message}");
    // Bad acks and a payload range outside the payload.
    let reply = raw
        .request(
            &RequestBody::Produce {
                acks: 5,
                timeout_ms: 1000,
                topics: vec![],
            },
            &[],
        )
        .unwrap();
    assert_eq!(reply.response().error(), ErrorCode::InvalidRequest);
    let body = RequestBody::Produce {
        acks: 1,
        timeout_ms: 1000,
        topics: vec![ProduceTopicRanges {
            name: "t".into(),
            partitions: vec![ProducePartitionRange {
                partition: 0,
                payload_offset: 10,
                payload_bytes: 1_000_000,
            }],
        }],
    };
    let reply = raw.request(&body, &good).unwrap();
    let response = reply.response();
    let code = response
        .body_as_produce_response()
        .unwrap()
        .topics()
        .unwrap()
        .get(0)
        .partitions()
        .unwrap()
        .get(0)
        .error();
    assert_eq!(code, ErrorCode::InvalidRequest);
    // None of it was appended.
    assert_eq!(high_watermark(&mut raw, "t", 0), 2);

    // Out-of-range fetch carries the valid range.
    let (error, high, start, _) = fetch(&mut raw, "t", 0, 50);
    assert_eq!((error, high, start), (ErrorCode::OffsetOutOfRange, 2, 0));
    assert_eq!(fetch(&mut raw, "t", 0, 0).0, ErrorCode::None);
    assert_eq!(fetch(&mut raw, "nope", 0, 0).0, ErrorCode::UnknownTopic);

    // Unknown request kind, unsupported version, unverifiable envelope.
    raw.send_raw(&envelope(200, 1));
    let reply = raw.read_reply().unwrap();
    assert_eq!(reply.response().error(), ErrorCode::UnknownRequestKind);
    assert_eq!(reply.response().correlation_id(), 77);
    raw.send_raw(&envelope(wire::RequestBody::ListTopicsRequest.0, 9));
    assert_eq!(
        raw.read_reply().unwrap().response().error(),
        ErrorCode::UnsupportedVersion
    );
    raw.send_raw(&framed(&[0xff; 64], &[]));
    assert_eq!(
        raw.read_reply().unwrap().response().error(),
        ErrorCode::MalformedRequest
    );
    // The connection still works after all of that.
    assert_eq!(produce(&mut raw, "t", 1, &good, -1).0, ErrorCode::None);
}

#[test]
fn broken_framing_closes_only_that_connection() {
    let broker = Broker::start("framing", &["--shards", "2"]);
    let mut healthy = Raw::open(broker.addr);
    assert_eq!(create(&mut healthy, "t", 1, &[]), ErrorCode::None);
    // A length prefix far over the limit: closed before anything is allocated.
    let mut huge = Raw::open(broker.addr);
    huge.send_raw(&u32::MAX.to_le_bytes());
    assert!(huge.is_closed_by_broker());
    // A frame too short to hold an envelope length.
    let mut short = Raw::open(broker.addr);
    short.send_raw(&[2, 0, 0, 0, 1, 1]);
    assert!(short.is_closed_by_broker());
    // An envelope length larger than its frame.
    let mut lying = Raw::open(broker.addr);
    lying.send_raw(&[8, 0, 0, 0, 255, 255, 0, 0, 1, 2, 3, 4]);
    assert!(lying.is_closed_by_broker());
    // No handshake first.
    let mut rude = Raw::connect(broker.addr);
    let reply = rude.request(&RequestBody::ListTopics, &[]).unwrap();
    assert_eq!(reply.response().error(), ErrorCode::HandshakeRequired);
    assert!(rude.is_closed_by_broker());
    // The healthy connection never noticed.
    assert_eq!(
        produce(&mut healthy, "t", 0, &batch(&[b"x"]), 1).0,
        ErrorCode::None
    );
}

#[test]
fn idle_connections_time_out_and_connections_are_bounded() {
    let broker = Broker::start(
        "limits",
        &[
            "--shards",
            "1",
            "--idle-timeout-secs",
            "1",
            "--max-connections",
            "2",
        ],
    );
    let mut first = Raw::open(broker.addr);
    let mut second = Raw::open(broker.addr);
    // A third connection is refused with a reason.
    let mut third = Raw::connect(broker.addr);
    let reply = third.read_reply().expect("a refusal");
    assert_eq!(reply.response().error(), ErrorCode::TooManyConnections);
    assert!(third.is_closed_by_broker());
    // Half-open or idle connections are closed after the idle timeout.
    let started = Instant::now();
    assert!(first.is_closed_by_broker());
    assert!(second.is_closed_by_broker());
    assert!(started.elapsed() < Duration::from_secs(10));
    // Their slots are free again.
    let mut again = Raw::open(broker.addr);
    assert_eq!(create(&mut again, "t", 1, &[]), ErrorCode::None);
}

#[test]
fn a_connection_on_one_shard_produces_to_a_partition_owned_by_another() {
    let broker = Broker::start("cross-shard", &["--shards", "2"]);
    let mut admin = Raw::open(broker.addr);
    assert_eq!(create(&mut admin, "x", 2, &[]), ErrorCode::None);
    let reply = admin
        .request(
            &RequestBody::Metadata {
                topics: vec!["x".into()],
            },
            &[],
        )
        .unwrap();
    let response = reply.response();
    let partitions = response
        .body_as_metadata_response()
        .unwrap()
        .topics()
        .unwrap()
        .get(0)
        .partitions()
        .unwrap();
    let owners: Vec<(u32, u16)> = partitions
        .iter()
        .map(|p| (p.partition(), p.shard()))
        .collect();
    assert_eq!(owners.len(), 2);
    assert_ne!(
        owners[0].1, owners[1].1,
        "two partitions on two shards: {owners:?}"
    );
    for (partition, owner) in owners {
        let other = 1 - owner;
        let mut raw = Raw::open_on_shard(broker.addr, other);
        let (error, base, _) = produce(&mut raw, "x", partition, &batch(&[b"hop", b"hop"]), 1);
        assert_eq!((error, base), (ErrorCode::None, 0));
        let (error, high, _, bytes) = fetch(&mut raw, "x", partition, 0);
        assert_eq!((error, high), (ErrorCode::None, 2));
        assert!(bytes > 0);
    }
}

#[test]
fn start_up_errors_are_one_readable_line() {
    let broker = Broker::start("startup", &["--shards", "2"]);
    let data = broker.data_dir.to_str().unwrap().to_string();
    // Port in use.
    let output = Broker::run_expecting_failure(&[
        "--data-dir",
        "/tmp/sluice-unused-dir",
        "--listen",
        &broker.brokers(),
        "--shards",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("in use") && stderr.contains("--listen"),
        "{stderr}"
    );
    // Another shard count on an existing data dir.
    let port = sluice_tests::free_port().to_string();
    let output = Broker::run_expecting_failure(&[
        "--data-dir",
        &data,
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--shards",
        "3",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--shards 2"), "{stderr}");
    // A data dir that cannot be written.
    let file = sluice_tests::scratch("startup-file").join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let output = Broker::run_expecting_failure(&[
        "--data-dir",
        file.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{port}"),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--data-dir"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
