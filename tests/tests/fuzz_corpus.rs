//! Runs every fuzz target's entry point (see `fuzz/` and docs/fuzzing.md) over its
//! committed corpus and over seeds generated here, on stable: CI exercises the
//! decoders with what the fuzzer found interesting without needing nightly.
//! `cargo test -p sluice-tests --test fuzz_corpus -- --ignored` writes the
//! generated seeds into `fuzz/corpus/` to start a fuzzing campaign from.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use sluice_broker::storage::checkpoint::Snapshot;
use sluice_broker::storage::format::{self, SegmentHeader};
use sluice_broker::storage::{IndexedFrame, LogState, WalPosition};
use sluice_broker::types::{Epoch, LogId, SegmentId, ShardId};
use sluice_client::batch::BatchBuilder;
use sluice_client::request::{
    encode_request, encode_request_frame, FetchPartitionSpec, ListOffsetsSpec, NewTopic,
    OffsetQuery, ProducePartitionRange, ProduceTopicRanges, RequestBody,
};
use zerocopy::IntoBytes;

type Target = fn(&[u8]);

fn targets() -> Vec<(&'static str, Target)> {
    vec![
        ("frame_reader", sluice_broker::fuzzing::frame_reader),
        ("request", sluice_broker::fuzzing::request),
        ("client_batch", sluice_broker::fuzzing::client_batch),
        ("record_decoder", sluice_client::fuzzing::record_decoder),
        ("wal_scan", sluice_broker::fuzzing::wal_scan),
        ("checkpoint", sluice_broker::fuzzing::checkpoint),
    ]
}

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn batch(records: usize, seed: u64) -> Bytes {
    let mut builder = BatchBuilder::with_capacity(4096);
    for i in 0..records {
        let key = format!("key-{seed}-{i}");
        let value = vec![(seed as u8).wrapping_add(i as u8); 10 + i * 7];
        let headers = vec![
            ("trace".to_string(), Some(Bytes::from_static(b"abc"))),
            ("empty".to_string(), None),
        ];
        let key = if i % 2 == 0 {
            Some(key.as_bytes())
        } else {
            None
        };
        builder
            .append(1_700_000_000_000 + i as i64, key, Some(&value), &headers)
            .unwrap();
    }
    builder.finish().unwrap()
}

fn stamped(frame: &Bytes, base_offset: u64, log: u32) -> Vec<u8> {
    let mut frame = frame.to_vec();
    format::stamp(&mut frame, base_offset, LogId(log), Epoch(3));
    frame
}

fn request_bodies() -> Vec<(RequestBody, Vec<u8>)> {
    let frame = batch(3, 1);
    vec![
        (
            RequestBody::Handshake {
                version_min: 1,
                version_max: 1,
                client_software: Some("seed".into()),
            },
            vec![],
        ),
        (
            RequestBody::Metadata {
                topics: vec!["orders".into(), "payments".into()],
            },
            vec![],
        ),
        (
            RequestBody::CreateTopics {
                topics: vec![NewTopic {
                    name: "orders".into(),
                    partitions: 3,
                    configs: vec![("retention.ms".into(), "3600000".into())],
                    replication_factor: 0,
                }],
                validate_only: true,
            },
            vec![],
        ),
        (
            RequestBody::DeleteTopics {
                names: vec!["old".into()],
            },
            vec![],
        ),
        (RequestBody::ListTopics, vec![]),
        (RequestBody::DescribeTopics { names: vec![] }, vec![]),
        (
            RequestBody::Produce {
                acks: -1,
                timeout_ms: 1000,
                topics: vec![ProduceTopicRanges {
                    name: "orders".into(),
                    partitions: vec![ProducePartitionRange {
                        partition: 1,
                        payload_offset: 0,
                        payload_bytes: frame.len() as u32,
                    }],
                }],
            },
            frame.to_vec(),
        ),
        (
            RequestBody::Fetch {
                max_wait_ms: 100,
                min_bytes: 1,
                max_bytes: 1 << 20,
                topics: vec![(
                    "orders".into(),
                    vec![FetchPartitionSpec {
                        partition: 0,
                        offset: 5,
                        max_bytes: 4096,
                        ..Default::default()
                    }],
                )],
            },
            vec![],
        ),
        (
            RequestBody::ListOffsets {
                topics: vec![(
                    "orders".into(),
                    vec![
                        ListOffsetsSpec {
                            partition: 0,
                            query: OffsetQuery::Earliest,
                        },
                        ListOffsetsSpec {
                            partition: 1,
                            query: OffsetQuery::Timestamp(5),
                        },
                    ],
                )],
            },
            vec![],
        ),
    ]
}

fn segment_image(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = vec![0u8; 4096];
    let header = SegmentHeader::new(ShardId(0), SegmentId(1), 1 << 20, 0);
    bytes[..header.as_bytes().len()].copy_from_slice(header.as_bytes());
    for frame in frames {
        bytes.extend_from_slice(frame);
    }
    bytes.resize(bytes.len() + 4096, 0);
    bytes
}

/// Seeds per target: valid inputs that reach deep into each decoder.
fn seeds() -> BTreeMap<&'static str, Vec<Vec<u8>>> {
    let mut seeds: BTreeMap<&'static str, Vec<Vec<u8>>> = BTreeMap::new();
    let mut stream = vec![0x05];
    let mut fbb = flatbuffers::FlatBufferBuilder::new();
    for (id, (body, payload)) in request_bodies().into_iter().enumerate() {
        let envelope = encode_request(&mut fbb, id as u32, "seed", &body).to_vec();
        seeds.entry("request").or_default().push(envelope);
        let mut head = BytesMut::new();
        encode_request_frame(&mut head, &mut fbb, id as u32, "seed", &body, payload.len()).unwrap();
        stream.extend_from_slice(&head);
        stream.extend_from_slice(&payload);
    }
    seeds
        .entry("frame_reader")
        .or_default()
        .push(stream.clone());
    stream[0] = 0x80;
    seeds.entry("frame_reader").or_default().push(stream);
    let batches: Vec<Bytes> = (0..4).map(|i| batch(1 + i, i as u64)).collect();
    seeds
        .entry("client_batch")
        .or_default()
        .push(batches.concat());
    seeds
        .entry("client_batch")
        .or_default()
        .push(batches[2].to_vec());
    let mut offset = 0;
    let stamped_frames: Vec<Vec<u8>> = batches
        .iter()
        .enumerate()
        .map(|(i, frame)| {
            let out = stamped(frame, offset, 1 + (i % 2) as u32);
            offset += 1 + i as u64;
            out
        })
        .collect();
    seeds
        .entry("record_decoder")
        .or_default()
        .push(stamped_frames.concat());
    let mut scan = vec![8u8];
    let frames: Vec<Vec<u8>> = (0..6u64).map(|i| stamped(&batch(2, i), i * 2, 7)).collect();
    scan.extend(segment_image(&frames));
    seeds.entry("wal_scan").or_default().push(scan.clone());
    let torn = scan.len() - 4096 - 40;
    scan[torn] ^= 0xff;
    seeds.entry("wal_scan").or_default().push(scan);
    let mut logs = std::collections::HashMap::new();
    let mut log = LogState::default();
    for (index, (base, byte, bytes)) in [(0, 4096, 500), (10, 9000, 700)].into_iter().enumerate() {
        log.push(IndexedFrame {
            base_offset: base,
            end_offset: base + 10,
            index: index as u64 + 1,
            term: 1,
            position: WalPosition::new(SegmentId(1), byte),
            bytes,
            max_timestamp_ms: 5 + index as i64,
        });
    }
    log.high_watermark = 20;
    log.next_offset = 20;
    logs.insert(LogId(4), log);
    let snapshot = Snapshot {
        shard: ShardId(1),
        scan_from: WalPosition::new(SegmentId(2), 8192),
        logs,
    };
    seeds
        .entry("checkpoint")
        .or_default()
        .push(snapshot.encode());
    let (replicated_scan, replicated_checkpoint) = replicated_seeds();
    seeds.entry("wal_scan").or_default().push(replicated_scan);
    seeds
        .entry("checkpoint")
        .or_default()
        .push(replicated_checkpoint);
    seeds
}

/// A segment image of a replicated log (hard state, a leader's no-op, batches, a
/// truncation and its replacement) and a checkpoint of such a log.
fn replicated_seeds() -> (Vec<u8>, Vec<u8>) {
    use sluice_broker::storage::{Anchor, Control, HardState, Replicated};
    let log = LogId(9);
    let state = |term: u64, commit: u64, next_index: u64, next_offset: u64| {
        Control::State {
            hard_state: HardState {
                term,
                vote: 1,
                commit,
            },
            anchor: Anchor {
                next_index,
                next_offset,
                prev_term: term,
                commit_offset: next_offset,
            },
        }
        .encode(log, next_offset, Epoch(term as u32), 0)
        .to_vec()
    };
    let noop = |offset: u64, term: u32| {
        Control::Entry {
            entry_type: 0,
            data: Bytes::new(),
            context: Bytes::new(),
        }
        .encode(log, offset, Epoch(term), 0)
        .to_vec()
    };
    let data = |offset: u64, term: u32, seed: u64| {
        let mut frame = batch(2, seed).to_vec();
        format::stamp(&mut frame, offset, log, Epoch(term));
        frame
    };
    let truncate = Control::Truncate {
        index: 3,
        offset: 2,
        reset: false,
        prev_term: 0,
    }
    .encode(log, 2, Epoch(2), 0)
    .to_vec();
    let frames = vec![
        state(1, 0, 1, 0),
        noop(0, 1),
        data(0, 1, 1),
        data(2, 1, 2),
        state(1, 2, 4, 4),
        truncate,
        data(2, 2, 3),
        state(2, 3, 4, 4),
    ];
    let mut scan = vec![8u8];
    scan.extend(segment_image(&frames));
    let mut entry = LogState::new_replicated();
    entry.replicated = Some(Replicated {
        start_term: 0,
        terms: vec![(1, 1), (3, 2)],
        hard_state: HardState {
            term: 2,
            vote: 1,
            commit: 3,
        },
        commit_index: 3,
        commit_offset: 4,
        sealed: false,
    });
    for (index, (base, byte)) in [(0u64, 4096u64), (0, 4300), (2, 9000)]
        .into_iter()
        .enumerate()
    {
        entry.push(IndexedFrame {
            base_offset: base,
            end_offset: if index == 0 { base } else { base + 2 },
            index: index as u64 + 1,
            term: if index < 2 { 1 } else { 2 },
            position: WalPosition::new(SegmentId(1), byte),
            bytes: 200,
            max_timestamp_ms: 0,
        });
    }
    let mut logs = std::collections::HashMap::new();
    logs.insert(log, entry);
    let checkpoint = Snapshot {
        shard: ShardId(0),
        scan_from: WalPosition::new(SegmentId(1), 12288),
        logs,
    }
    .encode();
    (scan, checkpoint)
}

#[test]
fn every_fuzz_target_survives_its_corpus_and_seeds() {
    let seeds = seeds();
    for (target, run) in targets() {
        let mut inputs: Vec<(String, Vec<u8>)> = seeds
            .get(target)
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(i, seed)| (format!("generated seed {i}"), seed.clone()))
            .collect();
        if let Ok(entries) = std::fs::read_dir(corpus_dir(target)) {
            for entry in entries {
                let path = entry.unwrap().path();
                inputs.push((path.display().to_string(), std::fs::read(&path).unwrap()));
            }
        }
        assert!(!inputs.is_empty(), "{target} has no inputs");
        for (name, input) in &inputs {
            let outcome = std::panic::catch_unwind(|| run(input));
            assert!(outcome.is_ok(), "fuzz target {target} panicked on {name}");
            // Every truncation of a seed too: the decoders meet partial input.
            if name.starts_with("generated") {
                for cut in (0..input.len()).step_by(input.len() / 64 + 1) {
                    run(&input[..cut]);
                }
            }
        }
        println!("{target}: {} inputs", inputs.len());
    }
}

#[test]
#[ignore = "writes fuzz/corpus/<target>/seed-* for a fuzzing campaign"]
fn write_seed_corpus() {
    for (target, inputs) in seeds() {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, input) in inputs.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), input).unwrap();
        }
    }
}
