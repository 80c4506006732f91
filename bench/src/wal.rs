//! `sluice-bench wal`: concurrent durable appenders against one shard's WAL.

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use sluice_broker::storage::{format, testkit, Wal, WalConfig};
use sluice_broker::types::{Epoch, LogId, ShardId};

/// Arguments of `sluice-bench wal`.
#[derive(clap::Args, Clone, Debug)]
pub struct WalArgs {
    /// Concurrent appenders (each appends to its own partition log).
    #[arg(long, default_value_t = 64)]
    appenders: u32,
    /// Bytes per appended batch.
    #[arg(long, default_value_t = 16 * 1024)]
    batch_bytes: usize,
    /// Records per batch.
    #[arg(long, default_value_t = 16)]
    records: usize,
    /// Seconds to measure.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Seconds of warm-up before measuring.
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// Directory for the WAL (must be a real filesystem; removed afterwards).
    /// Default: a fresh directory under ./target.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// CPU to pin the storage executor to.
    #[arg(long, default_value_t = 0)]
    cpu: usize,
    /// WAL segment size in MiB.
    #[arg(long, default_value_t = 256)]
    segment_mib: u64,
}

struct Totals {
    appends: u64,
    bytes: u64,
    latency_us: Histogram<u64>,
}

pub fn run(args: WalArgs) -> Result<(), String> {
    let dir = args.dir.clone().unwrap_or_else(|| {
        PathBuf::from("target").join(format!("sluice-bench-wal-{}", std::process::id()))
    });
    if dir.exists() {
        return Err(format!(
            "{} exists; give an empty or new --dir",
            dir.display()
        ));
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let body_args = args.clone();
    let body_dir = dir.clone();
    let handle = glommio::LocalExecutorBuilder::new(glommio::Placement::Fixed(args.cpu))
        .name("sluice-bench-wal")
        .spawn(move || async move { measure(body_args, body_dir).await })
        .map_err(|e| format!("cannot start the storage executor (is io_uring available?): {e}"))?;
    let result = handle
        .join()
        .map_err(|e| format!("executor failed: {e:?}"))?;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn measure(args: WalArgs, dir: PathBuf) -> Result<(), String> {
    let config = WalConfig {
        dir: dir.join("wal"),
        shard: ShardId(0),
        segment_bytes: args.segment_mib << 20,
        tail_cache_bytes: 64 << 20,
    };
    let (wal, _) = Wal::open(config).await.map_err(|e| e.to_string())?;
    let value_bytes = (args.batch_bytes / args.records.max(1))
        .saturating_sub(16)
        .max(1);
    let frame = Bytes::from(testkit::batch_of_size(0, args.records, value_bytes, 7));
    let info = format::verify_client_batch(&frame, usize::MAX).map_err(|e| e.to_string())?;
    let totals = Rc::new(RefCell::new(Totals {
        appends: 0,
        bytes: 0,
        latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?,
    }));
    let measuring = Rc::new(RefCell::new(false));
    let stop = Rc::new(RefCell::new(false));
    let mut tasks = Vec::new();
    for log in 0..args.appenders {
        wal.create_log(LogId(log));
        let (wal, frame, totals, measuring, stop) = (
            wal.clone(),
            frame.clone(),
            totals.clone(),
            measuring.clone(),
            stop.clone(),
        );
        tasks.push(glommio::spawn_local(async move {
            while !*stop.borrow() {
                let started = Instant::now();
                if let Err(error) = wal
                    .append(LogId(log), Epoch(0), &[(frame.clone(), info)])
                    .await
                {
                    return Err(error.to_string());
                }
                if *measuring.borrow() {
                    let mut totals = totals.borrow_mut();
                    totals.appends += 1;
                    totals.bytes += frame.len() as u64;
                    let _ = totals
                        .latency_us
                        .record(started.elapsed().as_micros().max(1) as u64);
                }
            }
            Ok(())
        }));
    }
    println!(
        "sluice-bench wal: {} appenders x {} B batches ({} records), durable (fdatasync before ack), executor pinned to CPU {}",
        args.appenders,
        frame.len(),
        args.records,
        args.cpu
    );
    glommio::timer::sleep(Duration::from_secs(args.warmup)).await;
    *measuring.borrow_mut() = true;
    let stats_start = wal.stats();
    let started = Instant::now();
    let mut last = (0u64, 0u64);
    for second in 1..=args.duration {
        glommio::timer::sleep(Duration::from_secs(1)).await;
        let totals = totals.borrow();
        println!(
            "{second:>4}s  {:>9} appends/s  {:>8.1} MB/s  p99 {:>6} us  max {:>6} us",
            totals.appends - last.0,
            (totals.bytes - last.1) as f64 / 1e6,
            totals.latency_us.value_at_quantile(0.99),
            totals.latency_us.max()
        );
        last = (totals.appends, totals.bytes);
    }
    *measuring.borrow_mut() = false;
    let elapsed = started.elapsed().as_secs_f64();
    *stop.borrow_mut() = true;
    for task in tasks {
        task.await?;
    }
    let stats = wal.stats();
    wal.close().await;
    let totals = totals.borrow();
    let syncs = stats.syncs - stats_start.syncs;
    println!(
        "total: {:.0} appends/s, {:.1} MB/s, {:.0} fdatasync/s ({:.1} appends per fdatasync)",
        totals.appends as f64 / elapsed,
        totals.bytes as f64 / elapsed / 1e6,
        syncs as f64 / elapsed,
        totals.appends as f64 / syncs.max(1) as f64
    );
    let h = &totals.latency_us;
    println!(
        "append latency us: p50 {} p90 {} p99 {} p99.9 {} p99.99 {} max {}",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.9),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.value_at_quantile(0.9999),
        h.max()
    );
    Ok(())
}
