//! Storage benchmarks for the shard WAL (`sluice_broker::storage::Wal`) on a real
//! filesystem (the workspace's `target/` directory, never tmpfs: glommio turns
//! O_DIRECT off on tmpfs).
//!
//! Group `wal_append`: durable append throughput. N appender tasks on one glommio
//! executor (pinned to CPU 0) each loop `wal.append(..)` of one stamped batch; an
//! append completes only after an `fdatasync` that covers it. One criterion
//! iteration is one append; the timing of a sample covers all K appends of the
//! sample spread over the N appenders. Matrix: appenders {1, 8, 64} x batch
//! {1, 16, 256} KiB.
//!
//! Group `wal_recovery`: `Wal::open` of a WAL holding ~1 GiB of 16 KiB batches with
//! no usable checkpoint, so recovery scans and verifies every frame.
//!
//! Besides criterion's output, every case prints one machine-readable line:
//!
//! ```text
//! SLUICE_BENCH wal_append appenders=8 batch_bytes=16384 bytes_per_sec=.. appends_per_sec=.. syncs_per_sec=.. ..
//! SLUICE_BENCH wal_recovery bytes=.. bytes_per_sec=.. ..
//! ```
//!
//! Environment knobs (for quick runs): `SLUICE_BENCH_RECOVERY_MIB` (default 1024),
//! `SLUICE_BENCH_MEASURE_SECS` (default 3).

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use glommio::{LocalExecutorBuilder, Placement};
use sluice_broker::storage::format::{self, BatchInfo};
use sluice_broker::storage::{testkit, Wal, WalConfig};
use sluice_broker::types::{Epoch, LogId, ShardId};

/// Where the WAL lives during the benches (removed afterwards).
const DATA_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench-wal");
/// Segment size: smaller than the 1 GiB default to keep disk use low; large enough
/// that rolls are rare (one per 256 MiB appended, as in production per 1 GiB).
const SEGMENT_BYTES: u64 = 256 << 20;
const TAIL_CACHE_BYTES: usize = 64 << 20;
const APPENDERS: [u32; 3] = [1, 8, 64];
const BATCH_BYTES: [usize; 3] = [1 << 10, 16 << 10, 256 << 10];
const WARM_UP: Duration = Duration::from_secs(1);
/// Batch size used to fill the WAL for the recovery bench.
const RECOVERY_BATCH_BYTES: usize = 16 << 10;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn wal_config(dir: &Path) -> WalConfig {
    WalConfig {
        dir: dir.to_path_buf(),
        shard: ShardId(0),
        segment_bytes: SEGMENT_BYTES,
        tail_cache_bytes: TAIL_CACHE_BYTES,
    }
}

/// A verified client batch whose frame is exactly `frame_bytes` long (one record).
fn batch(frame_bytes: usize, seed: u64) -> (Bytes, BatchInfo) {
    let timestamp = 1_700_000_000_000;
    // Header (80) plus record framing is a few bytes more than 80; adjust once.
    let mut value_bytes = frame_bytes - 100;
    let mut frame = testkit::batch_of_size(timestamp, 1, value_bytes, seed);
    if frame.len() != frame_bytes {
        value_bytes = value_bytes + frame_bytes - frame.len();
        frame = testkit::batch_of_size(timestamp, 1, value_bytes, seed);
    }
    let frame = Bytes::from(frame);
    let info = format::verify_client_batch(&frame, usize::MAX).expect("testkit batches verify");
    (frame, info)
}

fn reset_dir(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => panic!("cannot remove {}: {error}", dir.display()),
    }
}

fn executor(name: &str) -> LocalExecutorBuilder {
    LocalExecutorBuilder::new(Placement::Fixed(0)).name(name)
}

/// Waits (yielding to the executor) until the background task has zero-filled the
/// spare segment, so that the first measurement does not race it.
async fn wait_for_spare(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let full_segments = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "wal"))
                    .filter(|e| e.metadata().is_ok_and(|m| m.len() >= SEGMENT_BYTES))
                    .count()
            })
            .unwrap_or(0);
        if full_segments >= 2 || Instant::now() > deadline {
            break;
        }
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    // The header block is written and synced last.
    glommio::timer::sleep(Duration::from_millis(200)).await;
}

/// One timed run's outcome, sent from the executor thread.
#[derive(Clone, Copy, Default)]
struct RunStats {
    elapsed: Duration,
    appends: u64,
    bytes: u64,
    syncs: u64,
    writes: u64,
    sync_us: u64,
    rolls: u64,
}

enum Reply {
    Ready,
    Done(RunStats),
}

async fn appender(
    wal: Rc<Wal>,
    log: LogId,
    frame: Bytes,
    info: BatchInfo,
    remaining: Rc<Cell<u64>>,
) {
    let batches = [(frame, info)];
    while remaining.get() > 0 {
        remaining.set(remaining.get() - 1);
        wal.append(log, Epoch(0), &batches)
            .await
            .expect("durable append");
    }
}

/// Body of the executor thread of one `wal_append` case: opens the WAL, then runs
/// one timed batch of appends per command (0 = stop), deleting fully consumed
/// segments between runs (untimed) to bound disk use.
async fn append_case(
    dir: PathBuf,
    appenders: u32,
    frame_bytes: usize,
    commands: mpsc::Receiver<u64>,
    replies: mpsc::Sender<Reply>,
) {
    let (wal, _) = Wal::open(wal_config(&dir)).await.expect("open WAL");
    let logs: Vec<LogId> = (0..appenders).map(LogId).collect();
    for log in &logs {
        wal.create_log(*log);
    }
    let (frame, info) = batch(frame_bytes, u64::from(appenders) << 32 | frame_bytes as u64);
    wait_for_spare(&dir).await;
    replies.send(Reply::Ready).expect("bench thread alive");
    loop {
        let iters = loop {
            match commands.try_recv() {
                Ok(iters) => break iters,
                Err(mpsc::TryRecvError::Empty) => {
                    glommio::timer::sleep(Duration::from_millis(1)).await
                }
                Err(mpsc::TryRecvError::Disconnected) => break 0,
            }
        };
        if iters == 0 {
            break;
        }
        let before = wal.stats();
        let remaining = Rc::new(Cell::new(iters));
        let started = Instant::now();
        let tasks: Vec<_> = logs
            .iter()
            .map(|log| {
                glommio::spawn_local(appender(
                    wal.clone(),
                    *log,
                    frame.clone(),
                    info,
                    remaining.clone(),
                ))
            })
            .collect();
        for task in tasks {
            task.await;
        }
        let elapsed = started.elapsed();
        let after = wal.stats();
        let stats = RunStats {
            elapsed,
            appends: after.appends - before.appends,
            bytes: after.append_bytes - before.append_bytes,
            syncs: after.syncs - before.syncs,
            writes: after.writes - before.writes,
            sync_us: after.sync_us_total - before.sync_us_total,
            rolls: after.rolls - before.rolls,
        };
        replies
            .send(Reply::Done(stats))
            .expect("bench thread alive");
        // Untimed housekeeping: consume everything and delete dead segments.
        for log in &logs {
            let (_, high_watermark, _) = wal.log_offsets(*log).expect("known log");
            wal.advance_log_start(*log, high_watermark)
                .expect("known log");
        }
        wal.delete_dead_segments()
            .await
            .expect("delete dead segments");
    }
    wal.close().await;
}

fn bench_append(c: &mut Criterion) {
    let measure = Duration::from_secs(env_u64("SLUICE_BENCH_MEASURE_SECS", 3));
    let mut group = c.benchmark_group("wal_append");
    group
        .sample_size(10)
        .warm_up_time(WARM_UP)
        .measurement_time(measure);
    for &frame_bytes in &BATCH_BYTES {
        for &appenders in &APPENDERS {
            let dir = PathBuf::from(DATA_DIR).join(format!("append-{appenders}x{frame_bytes}"));
            reset_dir(&dir);
            let (command_tx, command_rx) = mpsc::channel::<u64>();
            let (reply_tx, reply_rx) = mpsc::channel::<Reply>();
            let thread_dir = dir.clone();
            let handle = executor("wal-bench-append")
                .spawn(move || {
                    append_case(thread_dir, appenders, frame_bytes, command_rx, reply_tx)
                })
                .expect("start glommio executor");
            assert!(matches!(
                reply_rx.recv().expect("executor started"),
                Reply::Ready
            ));
            // Totals over the measurement (runs after the warm-up time has elapsed).
            let mut totals = RunStats::default();
            let first_call = Instant::now();
            group.throughput(Throughput::Bytes(frame_bytes as u64));
            group.bench_function(
                BenchmarkId::new(format!("appenders={appenders}"), format!("{frame_bytes}B")),
                |b| {
                    b.iter_custom(|iters| {
                        command_tx.send(iters).expect("executor alive");
                        let Reply::Done(run) = reply_rx.recv().expect("executor alive") else {
                            panic!("unexpected reply")
                        };
                        if first_call.elapsed() > WARM_UP + Duration::from_millis(100) {
                            totals.elapsed += run.elapsed;
                            totals.appends += run.appends;
                            totals.bytes += run.bytes;
                            totals.syncs += run.syncs;
                            totals.writes += run.writes;
                            totals.sync_us += run.sync_us;
                            totals.rolls += run.rolls;
                        }
                        run.elapsed
                    })
                },
            );
            command_tx.send(0).expect("executor alive");
            handle.join().expect("executor finished");
            reset_dir(&dir);
            let secs = totals.elapsed.as_secs_f64().max(1e-9);
            let syncs = totals.syncs.max(1) as f64;
            println!(
                "SLUICE_BENCH wal_append appenders={appenders} batch_bytes={frame_bytes} bytes_per_sec={:.0} appends_per_sec={:.0} \
                 syncs_per_sec={:.0} writes_per_sec={:.0} appends_per_sync={:.2} mean_sync_us={:.0} appends={} seconds={:.3} rolls={}",
                totals.bytes as f64 / secs,
                totals.appends as f64 / secs,
                totals.syncs as f64 / secs,
                totals.writes as f64 / secs,
                totals.appends as f64 / syncs,
                totals.sync_us as f64 / syncs,
                totals.appends,
                secs,
                totals.rolls,
            );
        }
    }
    group.finish();
}

/// Fills `dir` with `bytes` of 16 KiB batches over 64 logs, closes the WAL cleanly
/// and returns the frame bytes written.
fn fill_wal(dir: &Path, bytes: u64) -> u64 {
    let dir = dir.to_path_buf();
    executor("wal-bench-fill")
        .spawn(move || async move {
            let (wal, _) = Wal::open(wal_config(&dir)).await.expect("open WAL");
            let (frame, info) = batch(RECOVERY_BATCH_BYTES, 7);
            let count = bytes / RECOVERY_BATCH_BYTES as u64;
            let remaining = Rc::new(Cell::new(count));
            let tasks: Vec<_> = (0..64)
                .map(|i| {
                    wal.create_log(LogId(i));
                    glommio::spawn_local(appender(
                        wal.clone(),
                        LogId(i),
                        frame.clone(),
                        info,
                        remaining.clone(),
                    ))
                })
                .collect();
            for task in tasks {
                task.await;
            }
            let written = wal.stats().append_bytes;
            wal.close().await;
            written
        })
        .expect("start glommio executor")
        .join()
        .expect("fill executor")
}

fn wal_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("list WAL dir")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    files.sort();
    files
}

/// Puts the directory back to the state after `fill_wal`: no checkpoint (the rolls
/// wrote some), no segments created by a later open's spare preparation.
fn forget_checkpoint(dir: &Path, original: &[PathBuf]) {
    for name in ["checkpoint", "checkpoint.tmp"] {
        let _ = std::fs::remove_file(dir.join(name));
    }
    for file in wal_files(dir) {
        if !original.contains(&file) {
            std::fs::remove_file(&file).expect("remove extra segment");
        }
    }
}

/// One recovery: `Wal::open` timed, then close.
fn recover_once(dir: &Path) -> (Duration, u64, u64, bool) {
    let dir = dir.to_path_buf();
    executor("wal-bench-recover")
        .spawn(move || async move {
            let started = Instant::now();
            let (wal, report) = Wal::open(wal_config(&dir)).await.expect("recover WAL");
            let elapsed = started.elapsed();
            wal.close().await;
            (
                elapsed,
                report.bytes_scanned,
                report.frames_scanned,
                report.checkpoint_used,
            )
        })
        .expect("start glommio executor")
        .join()
        .expect("recovery executor")
}

fn bench_recovery(c: &mut Criterion) {
    let dir = PathBuf::from(DATA_DIR).join("recovery");
    reset_dir(&dir);
    let target = env_u64("SLUICE_BENCH_RECOVERY_MIB", 1024) << 20;
    let fill_started = Instant::now();
    let written = fill_wal(&dir, target);
    let fill_secs = fill_started.elapsed().as_secs_f64();
    let original = wal_files(&dir);
    let segments_bytes: u64 = original
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let mut totals = (Duration::ZERO, 0u64, 0u64, 0u32);
    let mut group = c.benchmark_group("wal_recovery");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(env_u64("SLUICE_BENCH_MEASURE_SECS", 3)))
        .throughput(Throughput::Bytes(written));
    group.bench_function(
        BenchmarkId::new("open_no_checkpoint", format!("{}MiB", written >> 20)),
        |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    forget_checkpoint(&dir, &original);
                    let (elapsed, scanned, frames, checkpoint_used) = recover_once(&dir);
                    assert!(
                        !checkpoint_used,
                        "the recovery bench must scan without a checkpoint"
                    );
                    assert_eq!(scanned, written, "recovery must find every frame written");
                    total += elapsed;
                    totals.0 += elapsed;
                    totals.1 += scanned;
                    totals.2 += frames;
                    totals.3 += 1;
                }
                total
            })
        },
    );
    group.finish();
    reset_dir(&dir);
    let secs = totals.0.as_secs_f64().max(1e-9);
    println!(
        "SLUICE_BENCH wal_recovery bytes={written} segments={} segment_file_bytes={segments_bytes} batch_bytes={RECOVERY_BATCH_BYTES} \
         bytes_per_sec={:.0} frames_per_sec={:.0} seconds_per_gib={:.3} opens={} fill_bytes_per_sec={:.0}",
        original.len(),
        totals.1 as f64 / secs,
        totals.2 as f64 / secs,
        secs / (totals.1 as f64 / f64::from(1u32 << 30)),
        totals.3,
        written as f64 / fill_secs,
    );
}

fn cleanup(_: &mut Criterion) {
    reset_dir(Path::new(DATA_DIR));
}

criterion_group!(benches, bench_append, bench_recovery, cleanup);
criterion_main!(benches);
