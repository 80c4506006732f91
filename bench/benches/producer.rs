//! The client producer's whole hot path on one core: `Producer::send` of a
//! record (partition choice, buffer reservation, encoding into the open batch,
//! its delivery handle), sealing (with and without compression), framing the
//! produce request and writing it to the socket, measured as records/s of the
//! thread that does all of it. The records go to a broker started in this
//! process on CPU 0 (acks=0, so the producer counts a record as done once its
//! batch is written to the connection); the producer runs on a single-threaded
//! tokio runtime pinned to CPU 1, and each iteration is a burst of sends
//! followed by `flush`, so the time includes the sender task's framing and
//! socket writes.
//!
//! The time criterion is given is the producer thread's **CPU time**
//! (`CLOCK_THREAD_CPUTIME_ID`, user + system), not wall time: the broker, on
//! one core, cannot take 100-byte records as fast as one client core makes
//! them, and while its socket is full the producer thread sleeps. So the rate
//! reported is records per second of one client core.
//!
//! 100-byte values only: at 1 KiB the broker's disk, not the client, sets the
//! rate. `cargo bench -p sluice-bench --bench producer` (about a minute). Not run in
//! CI: it measures speed, and CI's machine is not this one.

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice_broker::runtime::{self, BrokerConfig};
use sluice_client::{
    Acks, Client, ClientConfig, Compression, Producer, ProducerConfig, ProducerRecord,
};

/// CPU time of the calling thread (user + system).
fn thread_cpu() -> Duration {
    let mut spec = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `spec` is a valid timespec for clock_gettime to fill.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut spec) };
    assert_eq!(status, 0, "CLOCK_THREAD_CPUTIME_ID");
    Duration::new(spec.tv_sec as u64, spec.tv_nsec as u32)
}

/// Records per criterion iteration (one burst, then a flush).
const BURST: u64 = 100_000;
/// Records per `send_many` call.
const SEND_MANY: u64 = 1_000;

fn pin(cpu: usize) {
    if let Some(id) = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .find(|id| id.id == cpu)
    {
        core_affinity::set_for_current(id);
    }
}

/// `bytes` of text that compresses a few times over, distinct per `seed`.
fn text_value(bytes: usize, seed: u64) -> Bytes {
    let mut text = String::with_capacity(bytes + 64);
    let mut n = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    while text.len() < bytes {
        n ^= n << 13;
        n ^= n >> 7;
        n ^= n << 17;
        text.push_str(&format!(
            "{{\"user\":{},\"event\":\"click\",\"id\":{}}}",
            n % 10_000,
            n % 1_000_000
        ));
    }
    text.truncate(bytes);
    Bytes::from(text)
}

fn bench_producer(c: &mut Criterion) {
    // Cargo's scratch directory for benches (under the workspace's target/, a
    // real filesystem), not the package directory a bench runs in.
    let data_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("producer-bench-{}", std::process::id()));
    std::fs::create_dir_all(&data_dir).expect("a data dir");
    let mut config = BrokerConfig::new(&data_dir, "127.0.0.1:0".parse().expect("an address"));
    config.shards = 1;
    config.cpus = Some(vec![0]);
    config.segment_bytes = 256 << 20;
    let broker = runtime::start(config).expect("the broker starts");
    pin(1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let client = rt
        .block_on(Client::connect(ClientConfig::new([broker
            .addr
            .to_string()])))
        .expect("connected");
    let mut group = c.benchmark_group("producer");
    group
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(6))
        .sample_size(10);
    for (value_bytes, compression) in [
        (100usize, Compression::None),
        (100, Compression::Lz4),
        (100, Compression::Zstd),
    ] {
        let topic = format!("hot-{value_bytes}-{compression}");
        rt.block_on(client.create_topic(&topic, 1, Vec::new()))
            .expect("the topic is created");
        let _context = rt.enter();
        let producer = Producer::new(
            client.clone(),
            ProducerConfig {
                acks: Acks::None,
                idempotent: false,
                batch_bytes: 256 << 10,
                linger: Duration::from_millis(5),
                compression,
                ..ProducerConfig::default()
            },
        );
        let values: Vec<Bytes> = (0..1024)
            .map(|seed| text_value(value_bytes, seed))
            .collect();
        let topic: std::sync::Arc<str> = topic.into();
        // Record `n` of a burst.
        let record = |n: u64| {
            ProducerRecord::new(topic.clone(), values[n as usize % values.len()].clone())
                .with_partition(0)
        };
        group.throughput(Throughput::Elements(BURST));
        group.bench_function(
            BenchmarkId::new("send_flush", format!("{value_bytes}B-{compression}")),
            |b| {
                b.iter_custom(|iterations| {
                    rt.block_on(async {
                        let started = thread_cpu();
                        for _ in 0..iterations {
                            for n in 0..BURST {
                                producer.send_detached(record(n)).await.expect("sent");
                            }
                            producer.flush().await.expect("flushed");
                        }
                        thread_cpu() - started
                    })
                })
            },
        );
        if compression == Compression::None {
            // The same records through the batch API, a call per 1,000 records
            // (filling the call's Vec of records again is counted too).
            group.bench_function(
                BenchmarkId::new("send_many_flush", format!("{value_bytes}B-{compression}")),
                |b| {
                    b.iter_custom(|iterations| {
                        rt.block_on(async {
                            let started = thread_cpu();
                            let mut records = Vec::with_capacity(SEND_MANY as usize);
                            for _ in 0..iterations {
                                for call in 0..BURST / SEND_MANY {
                                    records.clear();
                                    records.extend(
                                        (0..SEND_MANY).map(|i| record(call * SEND_MANY + i)),
                                    );
                                    producer.send_many_detached(&records).await.expect("sent");
                                }
                                producer.flush().await.expect("flushed");
                            }
                            thread_cpu() - started
                        })
                    })
                },
            );
            // The same through the batch API with the records built beforehand
            // (100 slices of 1,000, sent again each iteration): the producer's own
            // path alone, record -> batch -> frame -> socket.
            let prebuilt: Vec<Vec<ProducerRecord>> = (0..BURST / SEND_MANY)
                .map(|call| {
                    (0..SEND_MANY)
                        .map(|i| record(call * SEND_MANY + i))
                        .collect()
                })
                .collect();
            for (name, to_frame_only) in [
                ("send_many_prebuilt_flush", false),
                ("send_many_prebuilt_to_frame", true),
            ] {
                // `to_frame_only`: the CPU time inside the send_many calls alone
                // (record -> batch -> sealed frame with its CRC; the burst fits
                // the producer's buffer, so no call waits), not the sender task's
                // request framing and socket writes during the flush.
                group.bench_function(
                    BenchmarkId::new(name, format!("{value_bytes}B-{compression}")),
                    |b| {
                        b.iter_custom(|iterations| {
                            rt.block_on(async {
                                let mut spent = Duration::ZERO;
                                let mut started = thread_cpu();
                                for _ in 0..iterations {
                                    for records in &prebuilt {
                                        producer.send_many_detached(records).await.expect("sent");
                                    }
                                    if to_frame_only {
                                        spent += thread_cpu() - started;
                                    }
                                    producer.flush().await.expect("flushed");
                                    if to_frame_only {
                                        started = thread_cpu();
                                    }
                                }
                                if !to_frame_only {
                                    spent = thread_cpu() - started;
                                }
                                spent
                            })
                        })
                    },
                );
            }
        }
        rt.block_on(producer.close()).expect("closed");
    }
    group.finish();
    drop(client);
    broker.shutdown().expect("the broker stops");
    let _ = std::fs::remove_dir_all(&data_dir);
}

criterion_group!(benches, bench_producer);
criterion_main!(benches);
