//! Hostile clients at once — a connection flood past the limit, slow-loris senders,
//! garbage, giant lengths, deep pipelines, duplicate names, unknown kinds,
//! truncated flatbuffers — while a well-behaved client measures its latency: the
//! broker stays up, its memory stays bounded, and the good client keeps its p99.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use sluice_client::request::{ProducePartitionRange, ProduceTopicRanges, RequestBody};
use sluice_schema::wire::ErrorCode;
use sluice_tests::proto::*;
use sluice_tests::{Broker, Raw};

/// A well-behaved client's produce+fetch round trips for `duration`.
fn good_client_latencies(raw: &mut Raw, duration: Duration) -> Vec<Duration> {
    let mut latencies = Vec::new();
    let started = Instant::now();
    let mut offset = high_watermark(raw, "good", 0);
    while started.elapsed() < duration {
        let sent = Instant::now();
        let (error, base, message) = produce(raw, "good", 0, &batch(&[b"well behaved"]), 1);
        assert_eq!(error, ErrorCode::None, "{message}");
        assert_eq!(base, offset);
        let (error, _, _, bytes) = fetch(raw, "good", 0, offset);
        assert_eq!(error, ErrorCode::None);
        assert!(bytes > 0);
        offset += 1;
        latencies.push(sent.elapsed());
        std::thread::sleep(Duration::from_millis(10));
    }
    latencies
}

fn p99(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[(samples.len() - 1) * 99 / 100]
}

/// Runs `attack` in a loop on its own thread until `stop`.
fn attacker(stop: &Arc<AtomicBool>, attack: impl Fn() + Send + 'static) -> JoinHandle<()> {
    let stop = stop.clone();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            attack();
        }
    })
}

#[test]
fn hostile_clients_leave_the_broker_up_bounded_and_fair() {
    let broker = Broker::start(
        "hostile",
        &["--max-connections", "200", "--frame-timeout-secs", "3"],
    );
    let mut admin = Raw::open(broker.addr);
    assert_eq!(create(&mut admin, "good", 1, &[]), ErrorCode::None);
    assert_eq!(create(&mut admin, "target", 2, &[]), ErrorCode::None);
    let mut good = Raw::open(broker.addr);
    let calm = p99(good_client_latencies(&mut good, Duration::from_secs(3)));
    let rss_before = broker.rss_bytes();
    let addr = broker.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    // Connection flood past --max-connections: the extra ones are refused.
    threads.push(attacker(&stop, move || {
        let flood: Vec<TcpStream> = (0..300)
            .filter_map(|_| TcpStream::connect(addr).ok())
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        drop(flood);
    }));
    // Slow-loris: a byte every 300 ms on 20 connections.
    threads.push(attacker(&stop, move || {
        let mut lorises: Vec<Raw> = (0..20).filter_map(|_| Raw::try_open(addr)).collect();
        for _ in 0..20 {
            for loris in &mut lorises {
                let _ = loris.stream.write_all(&[0xff]);
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }));
    // Garbage and giant lengths, before and after the handshake.
    threads.push(attacker(&stop, move || {
        let mut rng = rand::rngs::StdRng::from_entropy();
        let garbage: Vec<u8> = (0..rng.gen_range(1..100_000)).map(|_| rng.gen()).collect();
        if let Ok(mut stream) = TcpStream::connect(addr) {
            let _ = stream.write_all(&garbage);
        }
        for length in [u32::MAX, 60 << 20] {
            if let Some(mut raw) = Raw::try_open(addr) {
                raw.send_raw(&length.to_le_bytes());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }));
    // Deep pipelines of cheap requests, never reading the answers until done.
    threads.push(attacker(&stop, move || {
        let Some(mut raw) = Raw::try_open(addr) else {
            return;
        };
        let mut bytes = Vec::new();
        for _ in 0..400 {
            bytes.extend(raw.encode(&RequestBody::ListTopics, &[]));
        }
        raw.send_raw(&bytes);
        for _ in 0..400 {
            if raw.read_reply().is_none() {
                break;
            }
        }
    }));
    // Duplicate names, unknown kinds, truncated flatbuffers, bad versions.
    threads.push(attacker(&stop, move || {
        let Some(mut raw) = Raw::try_open(addr) else {
            return;
        };
        let body = RequestBody::DescribeTopics {
            names: vec!["good".into(); 50],
        };
        let Some(reply) = raw.request(&body, &[]) else {
            return;
        };
        assert_eq!(reply.response().error(), ErrorCode::InvalidRequest);
        raw.send_raw(&envelope(200, 1));
        assert_eq!(
            raw.read_reply().unwrap().response().error(),
            ErrorCode::UnknownRequestKind
        );
        raw.send_raw(&envelope(5, 9));
        assert_eq!(
            raw.read_reply().unwrap().response().error(),
            ErrorCode::UnsupportedVersion
        );
        let whole = envelope(5, 1);
        let inner = &whole[8..whole.len() - 6];
        raw.send_raw(&framed(inner, &[]));
        assert_eq!(
            raw.read_reply().unwrap().response().error(),
            ErrorCode::MalformedRequest
        );
    }));
    // Pipelined produce floods from connections on one shard into partitions the
    // other shard owns (every batch crosses the mesh).
    for _ in 0..4 {
        threads.push(attacker(&stop, move || {
            let Some(mut raw) = Raw::try_open_on_shard(addr, 0) else {
                return;
            };
            let value = vec![1u8; 60_000];
            let frame = batch(&[&value]);
            let body = RequestBody::Produce {
                acks: 1,
                timeout_ms: 30_000,
                topics: vec![ProduceTopicRanges {
                    name: "target".into(),
                    partitions: vec![ProducePartitionRange {
                        partition: 0,
                        payload_offset: 0,
                        payload_bytes: frame.len() as u32,
                    }],
                }],
            };
            let mut bytes = Vec::new();
            for _ in 0..200 {
                bytes.extend(raw.encode(&body, &frame));
            }
            raw.send_raw(&bytes);
            for _ in 0..200 {
                if raw.read_reply().is_none() {
                    break;
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(1));
    let attacked = p99(good_client_latencies(&mut good, Duration::from_secs(8)));
    let rss_during = broker.rss_bytes();
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread.join().unwrap();
    }
    let grown = rss_during.saturating_sub(rss_before);
    assert!(
        grown < 768 << 20,
        "RSS grew by {} MiB under attack",
        grown >> 20
    );
    // "Keeps its p99": within a small factor of the calm figure (the produce
    // flood shares the disk's fsyncs), and bounded.
    let bound = (calm * 5).max(Duration::from_millis(150));
    assert!(
        attacked <= bound,
        "good client p99 {attacked:?} under attack, {calm:?} calm"
    );
    // Still up and serving, with nothing of the hostile traffic left behind.
    let mut raw = Raw::open(broker.addr);
    assert_eq!(
        produce(&mut raw, "good", 0, &batch(&[b"after"]), 1).0,
        ErrorCode::None
    );
    println!(
        "good client p99: calm {calm:?}, under attack {attacked:?}; RSS +{} MiB",
        grown >> 20
    );
}
