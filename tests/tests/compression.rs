//! Batch compression from outside, with a real broker process: the CLI producer
//! compresses with each codec and the CLI consumer reads the records back; the
//! broker stores and serves a compressed batch byte for byte as it came (and it
//! takes less disk); and compressed batches that lie — undefined codecs, wrong
//! declared sizes, blocks that do not decode, blocks that decode to malformed
//! records, decompression bombs — are refused with a typed error, store nothing
//! and cost the broker no memory.

#![allow(clippy::unwrap_used)]

use sluice_client::batch::{BatchBuilder, Compression};
use sluice_schema::batch as layout;
use sluice_schema::compression::RECORDS_BYTES_MAX;
use sluice_schema::wire::ErrorCode;
use sluice_tests::proto::*;
use sluice_tests::{Broker, Raw};

/// Newline-separated JSON-ish events: compressible, and distinct line by line.
fn event_lines(count: usize) -> String {
    (0..count)
        .map(|i| {
            format!(
                "{{\"seq\":{i},\"user\":\"user-{:04}\",\"action\":\"{}\",\"path\":\"/products/{}\"}}\n",
                (i * 7919) % 5000,
                ["view", "click", "purchase", "search"][i % 4],
                (i * 104_729) % 100_000
            )
        })
        .collect()
}

fn size_bytes(broker: &Broker, topic: &str) -> u64 {
    let describe = broker.cli_ok(&["topic", "describe", topic, "--format", "json"], None);
    let json: serde_json::Value = serde_json::from_str(&describe).unwrap();
    json["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["size_bytes"].as_u64().unwrap())
        .sum()
}

#[test]
fn every_codec_round_trips_through_the_cli_and_compressible_data_takes_less_disk() {
    let broker = Broker::start("compression-cli", &[]);
    let input = event_lines(20_000);
    let mut sizes = Vec::new();
    for codec in ["none", "snappy", "lz4", "zstd"] {
        let topic = format!("events-{codec}");
        broker.cli_ok(&["topic", "create", &topic, "--partitions", "2"], None);
        broker.cli_ok(
            &[
                "produce",
                &topic,
                "--acks",
                "all",
                "--linger-ms",
                "5",
                "--compression",
                codec,
            ],
            Some(&input),
        );
        let output = broker.cli_ok(
            &["consume", &topic, "--exit-at-end", "--format", "%v\n"],
            None,
        );
        let mut got: Vec<&str> = output.lines().collect();
        let mut want: Vec<&str> = input.lines().collect();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got.len(), want.len(), "{codec}: records consumed");
        assert!(got == want, "{codec}: the records read back differ");
        sizes.push((codec, size_bytes(&broker, &topic)));
    }
    eprintln!("stored bytes: {sizes:?}");
    let plain = sizes[0].1;
    for (codec, size) in &sizes[1..] {
        assert!(
            size * 2 < plain,
            "{codec}: {size} bytes stored against {plain} uncompressed"
        );
    }
    // An unknown codec is a usage error, not a silent default.
    let output = broker.cli(
        &["produce", "events-none", "--compression", "gzip"],
        Some("x\n"),
    );
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("gzip"));
}

/// The bytes of every batch in the first fetch from `offset`.
fn fetch_payload(raw: &mut Raw, topic: &str, offset: u64) -> Vec<u8> {
    let reply = raw.request(&fetch_body(topic, 0, offset), &[]).unwrap();
    assert_eq!(reply.response().error(), ErrorCode::None);
    reply.payload.to_vec()
}

#[test]
fn a_compressed_batch_is_stored_and_served_as_it_came() {
    let broker = Broker::start("compression-raw", &[]);
    let mut raw = Raw::open(broker.addr);
    assert_eq!(create(&mut raw, "packed", 1, &[]), ErrorCode::None);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let lines = event_lines(500);
    let mut offset = 0;
    for codec in [Compression::Snappy, Compression::Lz4, Compression::Zstd] {
        let mut builder = BatchBuilder::with_capacity(64 << 10);
        for line in lines.lines() {
            builder
                .append(now, None, Some(line.as_bytes()), &[])
                .unwrap();
        }
        let uncompressed = builder.bytes();
        builder.set_compression(codec);
        let sent = builder.finish().unwrap();
        assert!(sent.len() * 2 < uncompressed, "{codec}: {}", sent.len());
        let (error, base, message) = produce(&mut raw, "packed", 0, &sent, 1);
        assert_eq!(error, ErrorCode::None, "{codec}: {message}");
        assert_eq!(base, offset);
        let served = fetch_payload(&mut raw, "packed", offset);
        let frame = &served[..sent.len()];
        // Everything the client's CRC covers comes back unchanged.
        assert_eq!(
            &frame[layout::PAYLOAD_CRC_OFFSET..],
            &sent[layout::PAYLOAD_CRC_OFFSET..],
            "{codec}"
        );
        let batch =
            sluice_client::batch::Batch::verify(bytes::Bytes::copy_from_slice(frame)).unwrap();
        assert_eq!(batch.header.compression(), codec);
        let values: Vec<String> = batch
            .records()
            .map(|r| String::from_utf8(r.unwrap().value.unwrap().to_vec()).unwrap())
            .collect();
        assert_eq!(values, lines.lines().collect::<Vec<_>>(), "{codec}");
        offset += 500;
    }
    // The CLI consumer reads the mix of codecs in order.
    let output = broker.cli_ok(
        &["consume", "packed", "--exit-at-end", "--format", "%o\n"],
        None,
    );
    let offsets: Vec<u64> = output.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(offsets, (0..1500).collect::<Vec<_>>());
}

#[test]
fn compressed_batches_that_lie_are_refused_and_cost_no_memory() {
    let broker = Broker::start("compression-hostile", &["--shards", "1"]);
    let mut raw = Raw::open(broker.addr);
    assert_eq!(create(&mut raw, "guarded", 1, &[]), ErrorCode::None);
    let two = [good(0), good(1)].concat();
    let zstd = |bytes: &[u8]| {
        let mut out = Vec::new();
        Compression::Zstd.compress_into(bytes, &mut out).unwrap();
        out
    };
    let snappy = |bytes: &[u8]| {
        let mut out = Vec::new();
        Compression::Snappy.compress_into(bytes, &mut out).unwrap();
        out
    };
    let len = two.len() as u32;
    // A good compressed batch built by hand is accepted: the cases below differ
    // from it in one way each.
    let (error, _, message) = produce(&mut raw, "guarded", 0, &seal_as(&zstd(&two), 2, 4, len), 1);
    assert_eq!(error, ErrorCode::None, "{message}");
    let zeros = vec![0u8; RECORDS_BYTES_MAX];
    let bomb = zstd(&zeros);
    assert!(bomb.len() < 4096, "a {}-byte bomb", bomb.len());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "gzip (undefined here)",
            seal_as(&zstd(&two), 2, 1, len),
            "undefined codec 1",
        ),
        (
            "codec 7",
            seal_as(&zstd(&two), 2, 7, len),
            "undefined codec 7",
        ),
        (
            "compressed, no records_bytes",
            seal_as(&zstd(&two), 2, 4, 0),
            "records_bytes 0",
        ),
        (
            "records_bytes above the limit",
            seal_as(&zstd(&two), 2, 4, RECORDS_BYTES_MAX as u32 + 1),
            "records_bytes",
        ),
        (
            "uncompressed with records_bytes",
            seal_as(&two, 2, 0, len),
            "must be 0",
        ),
        (
            "declares fewer bytes than the block holds",
            seal_as(&zstd(&two), 2, 4, len - 1),
            "does not decode",
        ),
        (
            "declares more bytes than the block holds",
            seal_as(&snappy(&two), 2, 2, len + 1),
            "does not decode",
        ),
        (
            "a block that is not lz4",
            seal_as(&[0xf0; 64], 2, 3, len),
            "does not decode",
        ),
        (
            "a zstd block with the wrong codec bits (snappy)",
            seal_as(&zstd(&two), 2, 2, len),
            "does not decode",
        ),
        (
            "decodes, but to a record count it does not hold",
            seal_as(&snappy(&two), 3, 2, len),
            "record 2",
        ),
        (
            "decodes, but to a malformed record",
            {
                let bad = record(&[0, 0, 40], b"abc", &[0]);
                seal_as(&snappy(&bad), 1, 2, bad.len() as u32)
            },
            "key of 40 bytes",
        ),
        (
            "a bomb: 16 MiB of zeros in a few hundred bytes",
            seal_as(&bomb, 1, 4, zeros.len() as u32),
            "record",
        ),
    ];
    for (what, frame, expect) in &cases {
        let (error, _, message) = produce(&mut raw, "guarded", 0, frame, 1);
        assert_eq!(error, ErrorCode::InvalidBatch, "{what}: {message}");
        assert!(message.contains(expect), "{what}: {message}");
    }
    // A flood of bombs: each is decoded into a bounded buffer and let go.
    let rss_before = broker.rss_bytes();
    let frame = seal_as(&bomb, 1, 4, zeros.len() as u32);
    for _ in 0..64 {
        assert_eq!(
            produce(&mut raw, "guarded", 0, &frame, 1).0,
            ErrorCode::InvalidBatch
        );
    }
    let grown = broker.rss_bytes().saturating_sub(rss_before);
    assert!(grown < 48 << 20, "the broker grew by {grown} bytes");
    assert_eq!(
        high_watermark(&mut raw, "guarded", 0),
        2,
        "only the good batch"
    );
    let output = broker.cli_ok(
        &["consume", "guarded", "--exit-at-end", "--format", "%v\n"],
        None,
    );
    assert_eq!(output, "abc\nabc\n");
}
