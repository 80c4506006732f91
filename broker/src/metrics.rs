//! Node metrics: per-shard counters, gauges and fixed-bucket histograms in
//! atomics. Each shard writes only its own (`Relaxed`, no locks on the hot path);
//! the admin server reads them all when scraped and renders Prometheus text.
//! WAL figures are kept shard-locally by the WAL and copied here by the shard
//! every `PUBLISH_INTERVAL`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// How often a shard copies its WAL figures into its metrics.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(500);

/// Upper bounds (seconds) of latency histogram buckets (plus +Inf).
pub const LATENCY_BUCKETS: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Upper bounds of count histogram buckets (appends per fdatasync).
pub const COUNT_BUCKETS: [f64; 12] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// A histogram over fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    sum: AtomicU64,
    count: AtomicU64,
    /// Units of `sum` per unit of the bounds (1e6 for seconds kept in µs).
    scale: f64,
}

impl Histogram {
    /// Latency in seconds, observed in microseconds.
    pub fn latency() -> Histogram {
        Histogram::new(&LATENCY_BUCKETS, 1e6)
    }

    /// Plain counts.
    pub fn counts() -> Histogram {
        Histogram::new(&COUNT_BUCKETS, 1.0)
    }

    fn new(bounds: &'static [f64], scale: f64) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
            scale,
        }
    }

    /// Records one value (µs for latency histograms).
    pub fn observe(&self, value: u64) {
        let x = value as f64 / self.scale;
        let index = self
            .bounds
            .iter()
            .position(|bound| x <= *bound)
            .unwrap_or(self.bounds.len());
        self.buckets[index].fetch_add(1, Relaxed);
        self.sum.fetch_add(value, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// Adds another histogram's buckets (same shape) into `into`.
    fn add_into(&self, into: &mut HistogramSnapshot) {
        for (total, bucket) in into.buckets.iter_mut().zip(&self.buckets) {
            *total += bucket.load(Relaxed);
        }
        into.sum += self.sum.load(Relaxed) as f64 / self.scale;
        into.count += self.count.load(Relaxed);
    }

    fn snapshot(&self) -> HistogramSnapshot {
        let mut snapshot = HistogramSnapshot {
            bounds: self.bounds,
            buckets: vec![0; self.bounds.len() + 1],
            sum: 0.0,
            count: 0,
        };
        self.add_into(&mut snapshot);
        snapshot
    }
}

/// A histogram read at one moment.
#[derive(Clone, Debug)]
pub struct HistogramSnapshot {
    bounds: &'static [f64],
    buckets: Vec<u64>,
    /// Sum of observed values (seconds for latency).
    pub sum: f64,
    /// Observations.
    pub count: u64,
}

/// The stages of a produce request whose durations are kept
/// (`sluice_produce_stage_seconds{stage}`): `receive` (the frame's first byte
/// to its last), `verify` (envelope and batches checked, partitions located),
/// `append` (handed to the owning shard until durable there, including the
/// mesh hop), and per WAL write: `wal_queue` (queued until the write is
/// issued), `wal_write`, `wal_sync_wait` (written until the covering
/// fdatasync is issued) and `wal_sync`.
pub const PRODUCE_STAGES: [&str; 7] = [
    "receive",
    "verify",
    "append",
    "wal_queue",
    "wal_write",
    "wal_sync_wait",
    "wal_sync",
];

/// Index in [`PRODUCE_STAGES`].
#[derive(Clone, Copy, Debug)]
pub enum ProduceStage {
    /// See [`PRODUCE_STAGES`].
    Receive,
    /// See [`PRODUCE_STAGES`].
    Verify,
    /// See [`PRODUCE_STAGES`].
    Append,
    /// See [`PRODUCE_STAGES`].
    WalQueue,
    /// See [`PRODUCE_STAGES`].
    WalWrite,
    /// See [`PRODUCE_STAGES`].
    WalSyncWait,
    /// See [`PRODUCE_STAGES`].
    WalSync,
}

impl ShardMetrics {
    /// Records `us` microseconds spent in `stage`.
    pub fn stage(&self, stage: ProduceStage, us: u64) {
        self.produce_stages[stage as usize].observe(us);
    }
}

/// Request kinds, as metric labels (index = [`kind_index`]).
pub const REQUEST_KINDS: [&str; 17] = [
    "handshake",
    "metadata",
    "create_topics",
    "delete_topics",
    "list_topics",
    "describe_topics",
    "produce",
    "fetch",
    "list_offsets",
    "group_heartbeat",
    "offset_commit",
    "offset_fetch",
    "list_groups",
    "describe_group",
    "delete_group",
    "init_producer_id",
    "unknown",
];

/// The label index of a request kind (its union tag; unknown tags last).
pub fn kind_index(tag: u8) -> usize {
    let index = usize::from(tag).wrapping_sub(1);
    index.min(REQUEST_KINDS.len() - 1)
}

/// One shard's metrics.
#[derive(Debug)]
pub struct ShardMetrics {
    /// Requests served, by kind.
    pub requests: Vec<AtomicU64>,
    /// Requests answered with a request-level error, by kind.
    pub request_errors: Vec<AtomicU64>,
    /// Time from a request's arrival to its response being queued, by kind.
    pub request_latency: Vec<Histogram>,
    /// Partition results of produce requests that carried an error.
    pub produce_partition_errors: AtomicU64,
    /// Partition results of fetch requests that carried an error.
    pub fetch_partition_errors: AtomicU64,
    /// Bytes of record batches appended by produce requests.
    pub produced_bytes: AtomicU64,
    /// Records appended by produce requests.
    pub produced_records: AtomicU64,
    /// Bytes of record batches returned by fetches.
    pub fetched_bytes: AtomicU64,
    /// Open client connections.
    pub connections: AtomicI64,
    /// Client connections accepted.
    pub connections_accepted: AtomicU64,
    /// Requests sent to other shards over the mesh.
    pub mesh_requests: AtomicU64,
    /// Mesh requests this shard is waiting on now.
    pub mesh_in_flight: AtomicI64,
    /// WAL: batches appended.
    pub wal_appends: AtomicU64,
    /// WAL: bytes appended.
    pub wal_append_bytes: AtomicU64,
    /// WAL: writes issued.
    pub wal_writes: AtomicU64,
    /// WAL: fdatasync calls.
    pub wal_syncs: AtomicU64,
    /// WAL: segments rolled.
    pub wal_rolls: AtomicU64,
    /// WAL: segment files now.
    pub wal_segments: AtomicU64,
    /// WAL: bytes of segment files now.
    pub wal_segment_bytes: AtomicU64,
    /// WAL: reads served from the tail cache.
    pub cache_hits: AtomicU64,
    /// WAL: reads that went to disk.
    pub cache_misses: AtomicU64,
    /// WAL: bytes in the tail cache.
    pub cache_bytes: AtomicU64,
    /// fdatasync latency.
    pub sync_latency: Histogram,
    /// Where produce requests' time goes, by [`PRODUCE_STAGES`].
    pub produce_stages: Vec<Histogram>,
    /// Appends made durable per fdatasync (group commit).
    pub appends_per_sync: Histogram,
    /// Segments deleted by retention.
    pub retention_segments_deleted: AtomicU64,
    /// Log starts moved by retention.
    pub retention_log_starts_moved: AtomicU64,
    /// The shard has recovered its WAL and serves requests.
    pub ready: AtomicBool,
}

impl Default for ShardMetrics {
    fn default() -> Self {
        let counters = || {
            (0..REQUEST_KINDS.len())
                .map(|_| AtomicU64::new(0))
                .collect()
        };
        ShardMetrics {
            requests: counters(),
            request_errors: counters(),
            request_latency: (0..REQUEST_KINDS.len())
                .map(|_| Histogram::latency())
                .collect(),
            produce_partition_errors: AtomicU64::new(0),
            fetch_partition_errors: AtomicU64::new(0),
            produced_bytes: AtomicU64::new(0),
            produced_records: AtomicU64::new(0),
            fetched_bytes: AtomicU64::new(0),
            connections: AtomicI64::new(0),
            connections_accepted: AtomicU64::new(0),
            mesh_requests: AtomicU64::new(0),
            mesh_in_flight: AtomicI64::new(0),
            wal_appends: AtomicU64::new(0),
            wal_append_bytes: AtomicU64::new(0),
            wal_writes: AtomicU64::new(0),
            wal_syncs: AtomicU64::new(0),
            wal_rolls: AtomicU64::new(0),
            wal_segments: AtomicU64::new(0),
            wal_segment_bytes: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            cache_bytes: AtomicU64::new(0),
            sync_latency: Histogram::latency(),
            produce_stages: PRODUCE_STAGES
                .iter()
                .map(|_| Histogram::latency())
                .collect(),
            appends_per_sync: Histogram::counts(),
            retention_segments_deleted: AtomicU64::new(0),
            retention_log_starts_moved: AtomicU64::new(0),
            ready: AtomicBool::new(false),
        }
    }
}

/// Every shard's metrics.
#[derive(Debug, Clone)]
pub struct NodeMetrics {
    /// By shard index.
    pub shards: Arc<Vec<Arc<ShardMetrics>>>,
}

impl NodeMetrics {
    /// Metrics for `shards` shards.
    pub fn new(shards: usize) -> NodeMetrics {
        NodeMetrics {
            shards: Arc::new(
                (0..shards)
                    .map(|_| Arc::new(ShardMetrics::default()))
                    .collect(),
            ),
        }
    }

    /// Every shard has recovered and serves.
    pub fn all_ready(&self) -> bool {
        self.shards.iter().all(|s| s.ready.load(Relaxed))
    }

    /// Whether each shard has recovered and serves.
    pub fn shards_ready(&self) -> Vec<bool> {
        self.shards.iter().map(|s| s.ready.load(Relaxed)).collect()
    }

    /// Node-wide totals: produced records and bytes, fetched bytes, connections.
    pub fn totals(&self) -> Vec<(&'static str, f64)> {
        let sum = |get: &dyn Fn(&ShardMetrics) -> u64| -> f64 {
            self.shards.iter().map(|s| get(s) as f64).sum()
        };
        vec![
            (
                "produced_records",
                sum(&|s| s.produced_records.load(Relaxed)),
            ),
            ("produced_bytes", sum(&|s| s.produced_bytes.load(Relaxed))),
            ("fetched_bytes", sum(&|s| s.fetched_bytes.load(Relaxed))),
            (
                "connections",
                self.shards
                    .iter()
                    .map(|s| s.connections.load(Relaxed) as f64)
                    .sum(),
            ),
        ]
    }

    /// Per produce stage (as [`PRODUCE_STAGES`]): observations and their
    /// total in seconds, summed over shards.
    pub fn produce_stage_totals(&self) -> Vec<(&'static str, u64, f64)> {
        PRODUCE_STAGES
            .iter()
            .enumerate()
            .map(|(index, stage)| {
                let mut total = self.shards[0].produce_stages[index].snapshot();
                for s in &self.shards[1..] {
                    s.produce_stages[index].add_into(&mut total);
                }
                (*stage, total.count, total.sum)
            })
            .collect()
    }

    /// Prometheus text exposition of the per-shard metrics.
    pub fn render(&self, out: &mut String) {
        let shards = &self.shards;
        let counter =
            |out: &mut String, name: &str, help: &str, get: &dyn Fn(&ShardMetrics) -> u64| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
                for (i, s) in shards.iter().enumerate() {
                    let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", get(s));
                }
            };
        let gauge =
            |out: &mut String, name: &str, help: &str, get: &dyn Fn(&ShardMetrics) -> i64| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
                for (i, s) in shards.iter().enumerate() {
                    let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", get(s));
                }
            };
        let _ = writeln!(
            out,
            "# HELP sluice_requests_total Requests served, by shard and kind.\n# TYPE sluice_requests_total counter"
        );
        for (i, s) in shards.iter().enumerate() {
            for (k, kind) in REQUEST_KINDS.iter().enumerate() {
                let n = s.requests[k].load(Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "sluice_requests_total{{shard=\"{i}\",kind=\"{kind}\"}} {n}"
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP sluice_request_errors_total Requests answered with a request-level error.\n# TYPE sluice_request_errors_total counter"
        );
        for (i, s) in shards.iter().enumerate() {
            for (k, kind) in REQUEST_KINDS.iter().enumerate() {
                let n = s.request_errors[k].load(Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "sluice_request_errors_total{{shard=\"{i}\",kind=\"{kind}\"}} {n}"
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP sluice_request_duration_seconds Time from a request's arrival to its response, by kind (all shards).\n# TYPE sluice_request_duration_seconds histogram"
        );
        for (k, kind) in REQUEST_KINDS.iter().enumerate() {
            let mut total = shards[0].request_latency[k].snapshot();
            for s in shards.iter().skip(1) {
                s.request_latency[k].add_into(&mut total);
            }
            if total.count > 0 {
                histogram(
                    out,
                    "sluice_request_duration_seconds",
                    &format!("kind=\"{kind}\""),
                    &total,
                );
            }
        }
        counter(
            out,
            "sluice_produce_partition_errors_total",
            "Produce partition results with an error.",
            &|s| s.produce_partition_errors.load(Relaxed),
        );
        counter(
            out,
            "sluice_fetch_partition_errors_total",
            "Fetch partition results with an error.",
            &|s| s.fetch_partition_errors.load(Relaxed),
        );
        counter(
            out,
            "sluice_produced_bytes_total",
            "Bytes of record batches appended by produce requests.",
            &|s| s.produced_bytes.load(Relaxed),
        );
        counter(
            out,
            "sluice_produced_records_total",
            "Records appended by produce requests.",
            &|s| s.produced_records.load(Relaxed),
        );
        counter(
            out,
            "sluice_fetched_bytes_total",
            "Bytes of record batches returned by fetches.",
            &|s| s.fetched_bytes.load(Relaxed),
        );
        gauge(
            out,
            "sluice_connections",
            "Open client connections.",
            &|s| s.connections.load(Relaxed),
        );
        counter(
            out,
            "sluice_connections_accepted_total",
            "Client connections accepted.",
            &|s| s.connections_accepted.load(Relaxed),
        );
        counter(
            out,
            "sluice_mesh_requests_total",
            "Requests sent to other shards.",
            &|s| s.mesh_requests.load(Relaxed),
        );
        gauge(
            out,
            "sluice_mesh_in_flight",
            "Cross-shard requests waiting for their answer.",
            &|s| s.mesh_in_flight.load(Relaxed),
        );
        counter(
            out,
            "sluice_wal_appends_total",
            "Batches appended to the WAL.",
            &|s| s.wal_appends.load(Relaxed),
        );
        counter(
            out,
            "sluice_wal_append_bytes_total",
            "Bytes appended to the WAL.",
            &|s| s.wal_append_bytes.load(Relaxed),
        );
        counter(
            out,
            "sluice_wal_writes_total",
            "O_DIRECT writes issued.",
            &|s| s.wal_writes.load(Relaxed),
        );
        counter(out, "sluice_wal_fsyncs_total", "fdatasync calls.", &|s| {
            s.wal_syncs.load(Relaxed)
        });
        counter(
            out,
            "sluice_wal_segment_rolls_total",
            "WAL segments rolled.",
            &|s| s.wal_rolls.load(Relaxed),
        );
        gauge(out, "sluice_wal_segments", "WAL segment files.", &|s| {
            s.wal_segments.load(Relaxed) as i64
        });
        gauge(
            out,
            "sluice_wal_segment_bytes",
            "Bytes of WAL segment files.",
            &|s| s.wal_segment_bytes.load(Relaxed) as i64,
        );
        counter(
            out,
            "sluice_tail_cache_hits_total",
            "Reads served from the tail cache.",
            &|s| s.cache_hits.load(Relaxed),
        );
        counter(
            out,
            "sluice_tail_cache_misses_total",
            "Reads that went to disk.",
            &|s| s.cache_misses.load(Relaxed),
        );
        gauge(
            out,
            "sluice_tail_cache_bytes",
            "Bytes held by the tail cache.",
            &|s| s.cache_bytes.load(Relaxed) as i64,
        );
        counter(
            out,
            "sluice_retention_segments_deleted_total",
            "WAL segments deleted by retention.",
            &|s| s.retention_segments_deleted.load(Relaxed),
        );
        counter(
            out,
            "sluice_retention_log_starts_moved_total",
            "Partition log starts moved by retention.",
            &|s| s.retention_log_starts_moved.load(Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP sluice_wal_fsync_duration_seconds fdatasync latency.\n# TYPE sluice_wal_fsync_duration_seconds histogram"
        );
        for (i, s) in shards.iter().enumerate() {
            histogram(
                out,
                "sluice_wal_fsync_duration_seconds",
                &format!("shard=\"{i}\""),
                &s.sync_latency.snapshot(),
            );
        }
        let _ = writeln!(
            out,
            "# HELP sluice_produce_stage_seconds Where produce requests' time goes, by stage (all shards; see docs/operations.md).\n# TYPE sluice_produce_stage_seconds histogram"
        );
        for (index, stage) in PRODUCE_STAGES.iter().enumerate() {
            let mut total = shards[0].produce_stages[index].snapshot();
            for s in &shards[1..] {
                s.produce_stages[index].add_into(&mut total);
            }
            histogram(
                out,
                "sluice_produce_stage_seconds",
                &format!("stage=\"{stage}\""),
                &total,
            );
        }
        let _ = writeln!(
            out,
            "# HELP sluice_wal_appends_per_fsync Appends made durable by one fdatasync (group commit).\n# TYPE sluice_wal_appends_per_fsync histogram"
        );
        for (i, s) in shards.iter().enumerate() {
            histogram(
                out,
                "sluice_wal_appends_per_fsync",
                &format!("shard=\"{i}\""),
                &s.appends_per_sync.snapshot(),
            );
        }
        gauge(
            out,
            "sluice_shard_ready",
            "1 once the shard has recovered and serves.",
            &|s| i64::from(s.ready.load(Relaxed)),
        );
    }
}

fn histogram(out: &mut String, name: &str, labels: &str, h: &HistogramSnapshot) {
    let mut cumulative = 0;
    for (i, bound) in h.bounds.iter().enumerate() {
        cumulative += h.buckets[i];
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
    }
    cumulative += h.buckets[h.bounds.len()];
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum);
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_cumulative_buckets() {
        let metrics = NodeMetrics::new(1);
        metrics.shards[0].sync_latency.observe(80);
        metrics.shards[0].sync_latency.observe(3_000);
        metrics.shards[0].requests[kind_index(7)].fetch_add(2, Relaxed);
        let mut out = String::new();
        metrics.render(&mut out);
        assert!(
            out.contains("sluice_wal_fsync_duration_seconds_bucket{shard=\"0\",le=\"0.0001\"} 1"),
            "{out}"
        );
        assert!(out.contains("sluice_wal_fsync_duration_seconds_bucket{shard=\"0\",le=\"+Inf\"} 2"));
        assert!(out.contains("sluice_wal_fsync_duration_seconds_count{shard=\"0\"} 2"));
        assert!(out.contains("sluice_requests_total{shard=\"0\",kind=\"produce\"} 2"));
    }
}
