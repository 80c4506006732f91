//! CPU benchmarks for the per-request and per-batch hot paths that do no I/O.
//!
//! Groups (each sets a `Throughput`, so criterion reports rates):
//!
//! - `frame`: the client encoding a produce request frame head
//!   (`encode_request_frame`, requests/s), the client `FrameDecoder` splitting a
//!   socket-sized stream of produce frames (frames/s), and the broker verifying a
//!   produce envelope (`api::parse`, requests/s).
//! - `batch_crc`: the broker's `verify_client_batch` (header checks plus payload
//!   CRC) against a bare `crc32fast::hash` of the same bytes, at 1, 16 and 256 KiB
//!   (bytes/s).
//! - `partitioner`: `murmur2` and `partition_for_key` on 16- and 64-byte keys
//!   (keys/s).
//! - `batch_build`: `BatchBuilder` from `with_capacity` to `finish`, 100 records of
//!   100 B and 16 records of 1 KiB values, each with a 16-byte key (records/s).
//! - `mesh`: one cross-shard request/reply round trip over `Mesh` between two
//!   glommio executors (round trips/s; criterion's time per iteration is the
//!   round-trip latency). The time is measured inside executor 0, so it excludes
//!   the criterion thread's hand-off.
//!
//! Every group uses a short warm-up and measurement so the whole file runs in
//! about a minute: `cargo bench -p sluice-bench --bench hot_paths`.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use glommio::{LocalExecutorPoolBuilder, PoolPlacement, PoolThreadHandles};
use sluice_broker::limits::BATCH_BYTES_MAX;
use sluice_broker::mesh::{Mesh, MeshBuilders};
use sluice_broker::shard_messages::{ShardReply, ShardRequest};
use sluice_broker::storage::{format, testkit};
use sluice_client::batch::{BatchBuilder, HEADER_BYTES};
use sluice_client::frame::FrameDecoder;
use sluice_client::partitioner::{murmur2, partition_for_key};
use sluice_client::request::{
    encode_request, encode_request_frame, ProducePartitionRange, ProduceTopicRanges, RequestBody,
};

const WARM_UP: Duration = Duration::from_millis(500);
const MEASUREMENT: Duration = Duration::from_secs(2);
const SAMPLES: usize = 20;

const TIMESTAMP_MS: i64 = 1_700_000_000_000;
const SEED: u64 = 0x5eed;
const CLIENT_ID: &str = "sluice-bench";

/// Partitions in the benchmarked produce request, one batch each.
const PRODUCE_PARTITIONS: u32 = 4;
/// Bytes of each partition's batch in the produce payload.
const PRODUCE_BATCH_BYTES: usize = 1 << 10;
/// Frames in the stream the decoder splits per iteration.
const DECODE_FRAMES: usize = 32;
/// Bytes handed to the decoder per `push`, as one socket read would.
const DECODE_READ_BYTES: usize = 64 << 10;

const CRC_BATCH_BYTES: [usize; 3] = [1 << 10, 16 << 10, 256 << 10];
const KEY_BYTES: [usize; 2] = [16, 64];
const PARTITION_COUNT: u32 = 64;

/// (records, value bytes) per built batch.
const BUILD_SHAPES: [(usize, usize); 2] = [(100, 100), (16, 1 << 10)];
const BUILD_KEY_BYTES: usize = 16;

/// Executors in the mesh bench: a caller (0) and a server (1).
const MESH_SHARDS: usize = 2;
/// The mesh bench does no disk I/O; keep glommio's locked buffer memory small.
const MESH_IO_MEMORY_BYTES: usize = 1 << 20;
/// How often the serving executor checks the shutdown flag.
const MESH_SHUTDOWN_POLL: Duration = Duration::from_millis(1);

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .warm_up_time(WARM_UP)
        .measurement_time(MEASUREMENT)
        .sample_size(SAMPLES);
}

/// Deterministic filler bytes (xorshift), so nothing compresses or folds away.
fn filler(bytes: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..bytes)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A testkit client batch (one record) whose frame is exactly `frame_bytes` long.
fn client_batch(frame_bytes: usize) -> Vec<u8> {
    let mut value_bytes = frame_bytes.saturating_sub(HEADER_BYTES + 16);
    for _ in 0..4 {
        let frame = testkit::batch_of_size(TIMESTAMP_MS, 1, value_bytes, SEED);
        if frame.len() == frame_bytes {
            return frame;
        }
        // Varint length prefixes make the overhead depend a little on the size.
        value_bytes = (value_bytes + frame_bytes)
            .checked_sub(frame.len())
            .expect("frame overhead is smaller than the frame");
    }
    panic!("no testkit batch of exactly {frame_bytes} bytes");
}

/// A produce request to one topic, one `PRODUCE_BATCH_BYTES` batch per partition.
fn produce_request() -> (RequestBody, Vec<u8>) {
    let batch = client_batch(PRODUCE_BATCH_BYTES);
    let mut payload = Vec::new();
    let partitions = (0..PRODUCE_PARTITIONS)
        .map(|partition| {
            let range = ProducePartitionRange {
                partition,
                payload_offset: payload.len() as u32,
                payload_bytes: batch.len() as u32,
            };
            payload.extend_from_slice(&batch);
            range
        })
        .collect();
    let body = RequestBody::Produce {
        acks: -1,
        timeout_ms: 30_000,
        topics: vec![ProduceTopicRanges {
            name: "bench-topic".into(),
            partitions,
        }],
    };
    (body, payload)
}

fn bench_frame(c: &mut Criterion) {
    let (body, payload) = produce_request();
    // `FlatBufferBuilder` is inferred from `encode_request_frame`'s signature: this
    // crate does not depend on `flatbuffers` directly.
    let mut fbb = Default::default();
    let mut head = BytesMut::with_capacity(1024);

    let mut group = c.benchmark_group("frame");
    configure(&mut group);

    group.throughput(Throughput::Elements(1));
    group.bench_function("encode_produce_head", |b| {
        b.iter(|| {
            head.clear();
            encode_request_frame(
                &mut head,
                &mut fbb,
                black_box(7),
                CLIENT_ID,
                black_box(&body),
                payload.len(),
            )
            .expect("the produce frame encodes");
            black_box(head.len())
        })
    });

    let mut stream = Vec::new();
    for correlation_id in 0..DECODE_FRAMES as u32 {
        head.clear();
        encode_request_frame(
            &mut head,
            &mut fbb,
            correlation_id,
            CLIENT_ID,
            &body,
            payload.len(),
        )
        .expect("the produce frame encodes");
        stream.extend_from_slice(&head);
        stream.extend_from_slice(&payload);
    }
    let mut decoder = FrameDecoder::default();
    group.throughput(Throughput::Elements(DECODE_FRAMES as u64));
    group.bench_function(
        BenchmarkId::new("decode_stream", format!("{DECODE_FRAMES}_frames")),
        |b| {
            b.iter(|| {
                let mut frames = 0;
                for read in stream.chunks(DECODE_READ_BYTES) {
                    decoder.push(read);
                    while let Some(frame) = decoder.next_frame().expect("the stream is valid") {
                        black_box(&frame);
                        frames += 1;
                    }
                }
                assert_eq!(frames, DECODE_FRAMES);
                assert_eq!(decoder.buffered_bytes(), 0);
            })
        },
    );

    let envelope = encode_request(&mut fbb, 7, CLIENT_ID, &body).to_vec();
    sluice_broker::api::parse(&envelope).expect("the produce envelope verifies");
    group.throughput(Throughput::Elements(1));
    group.bench_function("broker_parse_produce", |b| {
        b.iter(|| {
            let request = sluice_broker::api::parse(black_box(&envelope));
            black_box(request.map(|request| request.correlation_id()))
        })
    });
    group.finish();
}

fn bench_batch_crc(c: &mut Criterion) {
    let mut group = c.benchmark_group("batch_crc");
    configure(&mut group);
    for frame_bytes in CRC_BATCH_BYTES {
        let batch = client_batch(frame_bytes);
        let info = format::verify_client_batch(&batch, BATCH_BYTES_MAX)
            .expect("the testkit batch verifies");
        assert_eq!(info.frame_bytes, frame_bytes);
        let label = format!("{}KiB", frame_bytes >> 10);
        group.throughput(Throughput::Bytes(frame_bytes as u64));
        group.bench_function(BenchmarkId::new("verify_client_batch", &label), |b| {
            b.iter(|| format::verify_client_batch(black_box(&batch), BATCH_BYTES_MAX))
        });
        group.bench_function(BenchmarkId::new("crc32fast_hash", &label), |b| {
            b.iter(|| crc32fast::hash(black_box(&batch)))
        });
    }
    group.finish();
}

fn bench_partitioner(c: &mut Criterion) {
    let mut group = c.benchmark_group("partitioner");
    configure(&mut group);
    group.throughput(Throughput::Elements(1));
    for key_bytes in KEY_BYTES {
        let key = filler(key_bytes, SEED);
        let label = format!("{key_bytes}B");
        group.bench_function(BenchmarkId::new("murmur2", &label), |b| {
            b.iter(|| murmur2(black_box(&key)))
        });
        group.bench_function(BenchmarkId::new("partition_for_key", &label), |b| {
            b.iter(|| partition_for_key(black_box(&key), black_box(PARTITION_COUNT)))
        });
    }
    group.finish();
}

fn bench_batch_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("batch_build");
    configure(&mut group);
    let key = filler(BUILD_KEY_BYTES, SEED);
    for (records, value_bytes) in BUILD_SHAPES {
        let value = filler(value_bytes, SEED + 1);
        let record_bytes_max = BatchBuilder::record_bytes_max(Some(&key), Some(&value), &[]);
        let capacity_bytes = HEADER_BYTES + records * record_bytes_max;
        group.throughput(Throughput::Elements(records as u64));
        group.bench_function(
            BenchmarkId::new("append_finish", format!("{records}x{value_bytes}B")),
            |b| {
                b.iter(|| {
                    let mut builder = BatchBuilder::with_capacity(capacity_bytes);
                    for index in 0..records {
                        builder
                            .append(
                                TIMESTAMP_MS + index as i64,
                                Some(black_box(&key)),
                                Some(black_box(&value)),
                                &[],
                            )
                            .expect("the record fits");
                    }
                    let frame: Bytes = builder.finish().expect("the batch is not empty");
                    frame
                })
            },
        );
    }
    group.finish();
}

/// Two glommio executors joined by a `Mesh`. Executor 0 runs `iters` sequential
/// round trips to executor 1 per command and answers with the elapsed time.
struct MeshPool {
    commands: mpsc::Sender<u64>,
    elapsed: mpsc::Receiver<Duration>,
    handles: PoolThreadHandles<Result<(), String>>,
}

/// Sets the flag when dropped, so executor 1 stops however executor 0 ends.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

impl MeshPool {
    fn start() -> MeshPool {
        let (commands, command_receiver) = mpsc::channel::<u64>();
        let (elapsed_sender, elapsed) = mpsc::channel::<Duration>();
        // Only executor 0 takes the receiver; the pool closure must be `Clone`.
        let command_receiver = Arc::new(Mutex::new(Some(command_receiver)));
        let shutdown = Arc::new(AtomicBool::new(false));
        let builders = MeshBuilders::new(MESH_SHARDS);
        let handles = LocalExecutorPoolBuilder::new(PoolPlacement::Unbound(MESH_SHARDS))
            .name("bench-mesh")
            .io_memory(MESH_IO_MEMORY_BYTES)
            .on_all_shards(move || async move {
                // Executor 1 exits only once the flag is set, so this matters for 0.
                let _shutdown_on_exit = SetOnDrop(shutdown.clone());
                let (mesh, inbox) = Mesh::join(builders).await?;
                mesh.serve(inbox, |_request| async { ShardReply::Done });
                if mesh.shard_index() != 0 {
                    drop(elapsed_sender);
                    while !shutdown.load(Ordering::Acquire) {
                        glommio::timer::sleep(MESH_SHUTDOWN_POLL).await;
                    }
                    return Ok(());
                }
                let commands = command_receiver
                    .lock()
                    .map_err(|_| "the command receiver lock is poisoned")?
                    .take()
                    .ok_or("the command receiver was taken twice")?;
                // Blocking here is fine: between commands no round trip is in flight,
                // so executor 0 has nothing else to run.
                while let Ok(iters) = commands.recv() {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let reply = mesh.call(1, ShardRequest::CreateLogs(Vec::new())).await;
                        if !matches!(reply, ShardReply::Done) {
                            return Err("executor 1 answered something other than Done".into());
                        }
                    }
                    if elapsed_sender.send(start.elapsed()).is_err() {
                        break;
                    }
                }
                Ok(())
            })
            .expect("the mesh executors start");
        MeshPool {
            commands,
            elapsed,
            handles,
        }
    }

    fn round_trips(&self, iters: u64) -> Duration {
        self.commands
            .send(iters)
            .expect("executor 0 takes commands");
        self.elapsed
            .recv()
            .expect("executor 0 reports the elapsed time")
    }

    /// Closing the command channel ends executor 0, which sets the shutdown flag.
    fn stop(self) {
        drop(self.commands);
        for result in self.handles.join_all() {
            result
                .expect("the mesh executor did not fail")
                .expect("the mesh executor ran cleanly");
        }
    }
}

fn bench_mesh(c: &mut Criterion) {
    let pool = MeshPool::start();
    let mut group = c.benchmark_group("mesh");
    configure(&mut group);
    group.throughput(Throughput::Elements(1));
    group.bench_function("round_trip_create_logs_empty", |b| {
        b.iter_custom(|iters| pool.round_trips(iters))
    });
    group.finish();
    pool.stop();
}

criterion_group!(
    benches,
    bench_frame,
    bench_batch_crc,
    bench_partitioner,
    bench_batch_build,
    bench_mesh
);
criterion_main!(benches);
