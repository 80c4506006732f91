//! The load itself: producers, consumers, end-to-end, against a broker address.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use sluice_client::{
    Acks, Client, ClientConfig, Compression, Consumer, ConsumerConfig, Producer, ProducerConfig,
    ProducerRecord, SeekTo,
};
use tokio::sync::mpsc;

use crate::machine::CpuSplit;
use crate::recorder::{progress, Interval, Recorder};

/// Deliveries a producer may hand its collector before waiting for it.
const COLLECTOR_QUEUE_MAX: usize = 4096;

/// Key distributions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Keys {
    /// No key; producer i writes to partition i mod partitions.
    None,
    /// Keys drawn uniformly from the key space.
    Uniform,
    /// Keys drawn from a Zipf distribution (s = 1) over the key space.
    Zipfian,
}

/// What one case does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Producers only; latency = send → acknowledgement.
    Produce,
    /// Consumers read a pre-filled topic; latency = fetch wait per batch.
    Consume,
    /// Producers and consumers; latency = send → consumed.
    E2e,
}

/// Workload knobs.
#[derive(clap::Args, Clone, Debug, Serialize)]
pub struct Workload {
    /// Producers (each with its own connections).
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    /// Consumers (consume and e2e).
    #[arg(long, default_value_t = 1)]
    pub consumers: usize,
    /// Topics (records spread over them round-robin).
    #[arg(long, default_value_t = 1)]
    pub topics: usize,
    /// Partitions per topic.
    #[arg(long, default_value_t = 1)]
    pub partitions: u32,
    /// Bytes of each record's value.
    #[arg(long, default_value_t = 1024)]
    pub message_bytes: usize,
    /// Records per batch (sets the producer's batch size).
    #[arg(long, default_value_t = 100)]
    pub records_per_batch: usize,
    /// Producer linger, milliseconds.
    #[arg(long, default_value_t = 1)]
    pub linger_ms: u64,
    /// Batches in flight per partition, per producer.
    #[arg(long, default_value_t = 5)]
    pub max_in_flight: usize,
    /// Batches a producer may hold unacknowledged (buffered + in flight) before
    /// `send` waits; default: a 64 MiB buffer. 1 = the seed's regime: send a
    /// batch, wait for its acknowledgement, send the next.
    #[arg(long)]
    pub max_buffered_batches: Option<usize>,
    /// Acknowledgements: 0, 1 or all.
    #[arg(long, default_value = "1")]
    pub acks: String,
    /// Replicas per partition of the topics the run creates (a cluster; 0: the
    /// cluster's default, min(3, nodes); a single node ignores it).
    #[arg(long, default_value_t = 0)]
    pub replication_factor: u16,
    /// Key distribution.
    #[arg(long, value_enum, default_value_t = Keys::None)]
    pub keys: Keys,
    /// Distinct keys for uniform/zipfian.
    #[arg(long, default_value_t = 10_000)]
    pub key_space: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Seconds of warm-up before measuring.
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// Open loop: total records/s, latency measured from each record's intended
    /// send time (coordinated omission corrected). Default: closed loop, max rate.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Records written before a consume run.
    #[arg(long, default_value_t = 500_000)]
    pub prefill_records: u64,
    /// Consumers: fetches in flight per broker shard (pieces of a partition
    /// read ahead at once); 1 = one fetch at a time.
    #[arg(long, default_value_t = ConsumerConfig::default().fetches_in_flight)]
    pub fetches_in_flight: usize,
    /// Idempotent producers (the client's default): `--idempotent false` turns
    /// it off.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub idempotent: bool,
    /// consume: the consumers join this consumer group one at a time (1, 2, ...
    /// --consumers) while a producer writes; reports how long each rebalance takes.
    #[arg(long)]
    pub group: Option<String>,
    /// Producers compress each batch: none, snappy, lz4 or zstd.
    #[arg(long, default_value = "none")]
    #[serde(serialize_with = "as_name")]
    pub compression: Compression,
    /// What values hold: random bytes or compressible text.
    #[arg(long, value_enum, default_value_t = Values::Random)]
    pub values: Values,
    /// Producers hand records to the client this many at a time
    /// (`Producer::send_many`) instead of one `send` per record; 1 = one at a
    /// time. Closed loop only (not with --rate).
    #[arg(long, default_value_t = 1)]
    pub send_many: usize,
}

fn as_name<S: serde::Serializer>(codec: &Compression, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(codec.name())
}

impl Workload {
    /// The acks setting.
    pub fn acks(&self) -> Result<Acks, String> {
        match self.acks.as_str() {
            "0" => Ok(Acks::None),
            "1" => Ok(Acks::Leader),
            "all" | "-1" => Ok(Acks::All),
            other => Err(format!("--acks must be 0, 1 or all, not {other}")),
        }
    }

    fn producer_config(&self) -> Result<ProducerConfig, String> {
        let batch_bytes = exact_batch_bytes(self.records_per_batch.max(1), self.message_bytes);
        let defaults = ProducerConfig::default();
        Ok(ProducerConfig {
            acks: self.acks()?,
            batch_bytes,
            linger: Duration::from_millis(self.linger_ms),
            max_in_flight: self.max_in_flight.max(1),
            idempotent: self.idempotent,
            compression: self.compression,
            buffer_bytes: self
                .max_buffered_batches
                .map(|n| n.max(1) * batch_bytes + self.message_bytes + 64)
                .unwrap_or(defaults.buffer_bytes),
            ..defaults
        })
    }
}

/// The `batch_bytes` at which a batch holds exactly `records` records of
/// `message_bytes`: a record is added while the batch's bytes plus the
/// producer's upper bound for a record fit, so the limit is the bytes of
/// `records - 1` records (built here as the producer builds them, timestamps
/// within a millisecond as in a closed loop) plus that bound. (An estimate of ~10
/// bytes of framing per record sealed 1 KiB batches one record early.)
fn exact_batch_bytes(records: usize, message_bytes: usize) -> usize {
    use sluice_client::batch::BatchBuilder;
    let value = vec![0u8; message_bytes];
    let mut builder = BatchBuilder::with_capacity(records * (message_bytes + 32));
    for _ in 1..records {
        if builder
            .append(1_700_000_000_000, None, Some(&value), &[])
            .is_err()
        {
            break;
        }
    }
    (builder.bytes() + BatchBuilder::record_bytes_max(None, Some(&value), &[])).max(256)
}

/// Latency percentiles, µs.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th.
    pub p90: u64,
    /// 99th.
    pub p99: u64,
    /// 99.9th.
    pub p999: u64,
    /// 99.99th.
    pub p9999: u64,
    /// Max.
    pub max: u64,
    /// Mean.
    pub mean: f64,
}

/// CPU used during the measured window.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct CpuUse {
    /// Seconds of CPU used by the embedded broker's shards (null when external).
    pub broker_seconds: Option<f64>,
    /// Broker CPU seconds per wall second (1.0 = one core busy).
    pub broker_cores: Option<f64>,
    /// Seconds of CPU used by the load generator.
    pub load_seconds: f64,
    /// Load-generator CPU seconds per wall second.
    pub load_cores: f64,
}

/// The mean duration of one produce stage in the broker.
#[derive(Clone, Debug, Serialize)]
pub struct Stage {
    /// Stage name (`receive`, `verify`, `append`, `wal_queue`, `wal_write`,
    /// `wal_sync_wait`, `wal_sync`).
    pub stage: String,
    /// Requests (or WAL writes, for the `wal_` stages) observed.
    pub count: u64,
    /// Mean, microseconds.
    pub mean_us: f64,
}

/// Produce requests in the measured window: their latency from being handed to
/// the connection until answered (a batch's acknowledgement latency, without
/// the time its records waited for it to fill), and how long sealed batches
/// waited for a request.
#[derive(Clone, Debug, Serialize)]
pub struct Requests {
    pub count: u64,
    pub failed: u64,
    /// Request latency, microseconds (within 1/16 of the value).
    pub latency_us: Percentiles,
    /// Sealed → sent, per batch, microseconds.
    pub queue_p50_us: u64,
    pub queue_p99_us: u64,
    /// Batches sent again after a retriable error, and the latest such error.
    pub batches_retried: u64,
    pub last_retry_error: Option<String>,
}

impl Requests {
    fn from_stats(stats: &sluice_client::ProducerStats) -> Option<Requests> {
        let latency = &stats.request_latency;
        if latency.count() == 0 {
            return None;
        }
        let us = |d: Duration| d.as_micros() as u64;
        Some(Requests {
            count: latency.count(),
            failed: stats.requests_failed,
            latency_us: Percentiles {
                p50: us(latency.quantile(0.5)),
                p90: us(latency.quantile(0.9)),
                p99: us(latency.quantile(0.99)),
                p999: us(latency.quantile(0.999)),
                p9999: us(latency.quantile(0.9999)),
                max: us(latency.max()),
                mean: latency.mean().as_micros() as f64,
            },
            queue_p50_us: us(stats.queue_time.quantile(0.5)),
            queue_p99_us: us(stats.queue_time.quantile(0.99)),
            batches_retried: stats.batches_retried,
            last_retry_error: stats.last_retry_error.clone(),
        })
    }
}

/// One measured case (the stable JSON schema; see BENCHMARKS.md).
#[derive(Clone, Debug, Serialize)]
pub struct Case {
    pub name: String,
    pub kind: Kind,
    pub regime: String,
    pub partitions: u32,
    pub topics: usize,
    pub producers: usize,
    pub consumers: usize,
    pub message_bytes: usize,
    pub records_per_batch: usize,
    #[serde(serialize_with = "as_name")]
    pub compression: Compression,
    pub values: Values,
    pub max_in_flight: usize,
    pub acks: String,
    pub keys: Keys,
    pub rate: Option<f64>,
    pub durability: String,
    pub duration_secs: f64,
    pub records: u64,
    pub records_per_sec: f64,
    pub bytes_per_sec: f64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub latency_us: Percentiles,
    pub cpu: CpuUse,
    pub per_second: Vec<Interval>,
    /// Embedded broker: mean time of a produce request's stages during the
    /// measured window (see `sluice_produce_stage_seconds`).
    pub broker_stages: Option<Vec<Stage>>,
    /// Produce requests during the measured window, as the producers saw them
    /// (none for consume runs).
    pub requests: Option<Requests>,
    #[serde(skip)]
    pub histogram: Option<hdrhistogram::Histogram<u64>>,
}

/// Runs one case against `brokers`.
pub async fn run_case(
    brokers: &str,
    kind: Kind,
    workload: &Workload,
    name: &str,
    regime: &str,
    embedded: bool,
    tty: bool,
) -> Result<Case, String> {
    let client = connect(brokers).await?;
    let run_id = format!(
        "{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    );
    let topics: Vec<String> = (0..workload.topics.max(1))
        .map(|t| format!("bench-{name}-{t}-{run_id}"))
        .collect();
    for topic in &topics {
        client
            .create_topic_replicated(
                topic,
                workload.partitions.max(1),
                workload.replication_factor,
                vec![],
            )
            .await
            .map_err(|e| format!("create topic {topic}: {e}"))?;
    }
    let recorder = Arc::new(Recorder::default());
    let stop = Arc::new(AtomicBool::new(false));
    if kind == Kind::Consume {
        prefill(&client, &topics, workload).await?;
    }
    let mut tasks = Vec::new();
    // A consume run reads a fixed pre-filled amount: measure from the first fetch
    // (no warm-up, which would read it all unmeasured) until it is all consumed.
    let (warmup, target_records) = match kind {
        Kind::Consume => (Duration::ZERO, Some(workload.prefill_records)),
        _ => (Duration::from_secs(workload.warmup), None),
    };
    if kind == Kind::Consume {
        recorder.start_measuring();
    }
    if kind != Kind::Consume {
        for index in 0..workload.producers.max(1) {
            let task = producer_task(
                client.clone(),
                topics.clone(),
                index,
                workload.clone(),
                recorder.clone(),
                stop.clone(),
                kind == Kind::E2e,
            );
            tasks.push(tokio::spawn(task));
        }
    }
    if kind != Kind::Produce {
        for index in 0..workload.consumers.max(1) {
            let task = consumer_task(
                client.clone(),
                topics.clone(),
                index,
                workload.clone(),
                recorder.clone(),
                stop.clone(),
                kind,
            );
            tasks.push(tokio::spawn(task));
        }
    }
    tokio::time::sleep(warmup).await;
    if kind != Kind::Consume {
        recorder.start_measuring();
    }
    let cpu_before = CpuSplit::now();
    let stages_before = embedded.then(crate::embedded::stage_totals).flatten();
    let requests_before = recorder.producer_stats();
    let started = Instant::now();
    let label = format!("{name} ({regime})");
    let intervals = progress(
        &recorder,
        started,
        Duration::from_secs(workload.duration.max(1)),
        &label,
        tty,
        target_records,
    )
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    recorder.stop_measuring();
    let requests = Requests::from_stats(&recorder.producer_stats().since(&requests_before));
    let cpu = CpuSplit::now().since(cpu_before);
    let stages = stages_before.and_then(|before| {
        let after = crate::embedded::stage_totals()?;
        Some(
            before
                .iter()
                .zip(after)
                .map(|((stage, count0, seconds0), (_, count1, seconds1))| {
                    let count = count1.saturating_sub(*count0);
                    Stage {
                        stage: stage.to_string(),
                        count,
                        mean_us: if count == 0 {
                            0.0
                        } else {
                            (seconds1 - seconds0) * 1e6 / count as f64
                        },
                    }
                })
                .collect::<Vec<_>>(),
        )
    });
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        if let Ok(Err(error)) = task.await {
            recorder.error(error);
        }
    }
    for topic in &topics {
        let _ = client.delete_topic(topic).await;
    }
    let (records, bytes, errors, first_error, histogram) = recorder.totals();
    let pct = |q: f64| {
        if histogram.is_empty() {
            0
        } else {
            histogram.value_at_quantile(q)
        }
    };
    let acks = workload.acks()?;
    Ok(Case {
        name: name.to_string(),
        kind,
        regime: regime.to_string(),
        partitions: workload.partitions,
        topics: topics.len(),
        producers: if kind == Kind::Consume {
            0
        } else {
            workload.producers
        },
        consumers: if kind == Kind::Produce {
            0
        } else {
            workload.consumers
        },
        message_bytes: workload.message_bytes,
        records_per_batch: workload.records_per_batch,
        compression: workload.compression,
        values: workload.values,
        max_in_flight: workload.max_in_flight,
        acks: workload.acks.clone(),
        keys: workload.keys,
        rate: workload.rate,
        durability: durability(acks),
        duration_secs: elapsed,
        records,
        records_per_sec: records as f64 / elapsed,
        bytes_per_sec: bytes as f64 / elapsed,
        errors,
        first_error,
        latency_us: Percentiles {
            p50: pct(0.5),
            p90: pct(0.9),
            p99: pct(0.99),
            p999: pct(0.999),
            p9999: pct(0.9999),
            max: histogram.max(),
            mean: if histogram.is_empty() {
                0.0
            } else {
                histogram.mean()
            },
        },
        cpu: CpuUse {
            broker_seconds: embedded.then_some(cpu.broker_seconds),
            broker_cores: embedded.then_some(cpu.broker_seconds / elapsed),
            load_seconds: cpu.load_seconds,
            load_cores: cpu.load_seconds / elapsed,
        },
        per_second: intervals,
        broker_stages: stages.filter(|stages| stages.iter().any(|s| s.count > 0)),
        requests,
        histogram: Some(histogram),
    })
}

/// The durability statement for an acks setting.
pub fn durability(acks: Acks) -> String {
    match acks {
        Acks::None => {
            "acks=0: not acknowledged (the broker still appends through its fdatasync'd WAL)".into()
        }
        Acks::Leader => "acks=1: acknowledged only after fdatasync of the leader's WAL".into(),
        Acks::All => "acks=all: acknowledged only after fdatasync on a majority of the partition's replicas (a single node: its WAL)".into(),
    }
}

async fn connect(brokers: &str) -> Result<Client, String> {
    let mut config = ClientConfig::new(brokers.split(',').map(str::to_string));
    config.client_id = "sluice-bench".into();
    Client::connect(config)
        .await
        .map_err(|e| format!("cannot connect to {brokers}: {e}"))
}

/// What record values hold.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Values {
    /// Random bytes (incompressible).
    Random,
    /// JSON-like event lines (user, action, path, session id, latency): about
    /// what an event pipeline carries, compressible a few times over.
    Text,
}

/// Distinct values a producer cycles through, so that a batch (up to
/// `VALUE_POOL_MAX` records) never holds the same value twice and compression
/// sees realistic data rather than repeats.
struct ValuePool {
    values: Vec<Bytes>,
    next: usize,
}

/// Values in a pool, at most (and at most 64 MiB of them).
const VALUE_POOL_MAX: usize = 4096;

impl ValuePool {
    fn new(kind: Values, bytes: usize, seed: u64) -> ValuePool {
        let count = (64 << 20) / bytes.max(1);
        let count = count.clamp(1, VALUE_POOL_MAX);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let values = (0..count)
            .map(|_| match kind {
                Values::Random => {
                    let mut value = vec![0u8; bytes];
                    rng.fill(&mut value[..]);
                    Bytes::from(value)
                }
                Values::Text => text_value(&mut rng, bytes),
            })
            .collect();
        ValuePool { values, next: 0 }
    }

    fn next(&mut self) -> &Bytes {
        let value = &self.values[self.next];
        self.next = (self.next + 1) % self.values.len();
        value
    }
}

/// `bytes` of newline-separated JSON events drawn from `rng`.
fn text_value(rng: &mut impl Rng, bytes: usize) -> Bytes {
    use std::fmt::Write;
    const ACTIONS: [&str; 8] = [
        "view",
        "click",
        "add_to_cart",
        "purchase",
        "search",
        "login",
        "logout",
        "scroll",
    ];
    let mut text = String::with_capacity(bytes + 256);
    while text.len() < bytes {
        let _ = writeln!(
            text,
            "{{\"ts\":{},\"user\":\"user-{:05}\",\"action\":\"{}\",\"path\":\"/products/{}/reviews?page={}\",\"session\":\"{:016x}\",\"latency_ms\":{},\"ok\":{}}}",
            1_700_000_000_000u64 + rng.gen_range(0..86_400_000u64),
            rng.gen_range(0..50_000u32),
            ACTIONS[rng.gen_range(0..ACTIONS.len())],
            rng.gen_range(0..100_000u32),
            rng.gen_range(1..20u32),
            rng.gen::<u64>(),
            rng.gen_range(1..2_000u32),
            rng.gen_bool(0.97),
        );
    }
    text.truncate(bytes);
    Bytes::from(text.into_bytes())
}

/// Zipf(s = 1) sampler over `0..n` by inverse CDF.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: u64) -> Zipf {
        let n = n.clamp(1, 1_000_000) as usize;
        let mut cdf = Vec::with_capacity(n);
        let mut sum = 0.0;
        for k in 1..=n {
            sum += 1.0 / k as f64;
            cdf.push(sum);
        }
        for value in cdf.iter_mut() {
            *value /= sum;
        }
        Zipf { cdf }
    }

    fn sample(&self, rng: &mut impl Rng) -> u64 {
        let u: f64 = rng.gen();
        self.cdf.partition_point(|c| *c < u) as u64
    }
}

/// Records per `send_many` call at most (`--send-many`).
const SEND_MANY_MAX: usize = 1_000_000;

async fn producer_task(
    client: Client,
    topics: Vec<String>,
    index: usize,
    workload: Workload,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
    stamp_values: bool,
) -> Result<(), String> {
    if workload.send_many > 1 && workload.rate.is_some() {
        return Err("--send-many is for a closed loop: it cannot go with --rate".into());
    }
    if workload.send_many > SEND_MANY_MAX {
        return Err(format!("--send-many is at most {SEND_MANY_MAX}"));
    }
    let producer = Arc::new(Producer::new(client, workload.producer_config()?));
    recorder.add_producer(producer.clone());
    // One record per message, or one call's records (`--send-many`).
    let value_bytes = workload.message_bytes;
    let (tx, collector) = spawn_collector(recorder.clone(), value_bytes, stamp_values);
    let (many_tx, many_collector) = spawn_collector(recorder.clone(), value_bytes, stamp_values);
    let topics: Vec<Arc<str>> = topics.iter().map(|t| Arc::from(t.as_str())).collect();
    let mut values = ValuePool::new(workload.values, workload.message_bytes, index as u64 + 1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed + index as u64);
    let zipf = (workload.keys == Keys::Zipfian).then(|| Zipf::new(workload.key_space));
    let per_producer_rate = workload
        .rate
        .map(|r| (r / workload.producers.max(1) as f64).max(1e-3));
    let started = Instant::now();
    let mut sent: u64 = 0;
    let mut many: Vec<ProducerRecord> = Vec::with_capacity(workload.send_many);
    while !stop.load(Ordering::Relaxed) {
        if workload.send_many > 1 {
            // Closed loop, a call per `send_many` records: their latency counts
            // from the call.
            many.clear();
            while many.len() < workload.send_many {
                let topic = topics[(sent as usize + many.len()) % topics.len()].clone();
                let record = ProducerRecord::new(topic, stamped(values.next(), stamp_values));
                many.push(keyed(record, &workload, index, &mut rng, zipf.as_ref()));
            }
            let due = Instant::now();
            match producer.send_many(&many).await {
                Ok(deliveries) => {
                    if many_tx.send((due, deliveries)).await.is_err() {
                        break;
                    }
                }
                Err(error) => {
                    recorder.error(error.to_string());
                    break;
                }
            }
            sent += many.len() as u64;
            tokio::task::yield_now().await;
            continue;
        }
        // Open loop: the record is due at its slot whether or not we are late.
        let due = match per_producer_rate {
            Some(rate) => {
                let due = started + Duration::from_secs_f64(sent as f64 / rate);
                if due > Instant::now() {
                    tokio::time::sleep_until(due.into()).await;
                }
                due
            }
            None => Instant::now(),
        };
        let topic = topics[(sent as usize) % topics.len()].clone();
        let record = ProducerRecord::new(topic, stamped(values.next(), stamp_values));
        let record = keyed(record, &workload, index, &mut rng, zipf.as_ref());
        match producer.send(record).await {
            Ok(delivery) => {
                if tx.send((due, std::iter::once(delivery))).await.is_err() {
                    break;
                }
            }
            Err(error) => {
                recorder.error(error.to_string());
                break;
            }
        }
        sent += 1;
        if sent.is_multiple_of(1024) {
            tokio::task::yield_now().await;
        }
    }
    let _ = producer.flush().await;
    drop(tx);
    drop(many_tx);
    let _ = collector.await;
    let _ = many_collector.await;
    producer.close().await.map_err(|e| e.to_string())
}

/// A task that awaits each delivery sent to it and records its latency from
/// when it was due. Bounded: if the collector falls behind (the load
/// generator's core is busy), the producer waits instead of queueing deliveries
/// whose latency would then include the backlog.
fn spawn_collector<D>(
    recorder: Arc<Recorder>,
    value_bytes: usize,
    stamp_values: bool,
) -> (mpsc::Sender<(Instant, D)>, tokio::task::JoinHandle<()>)
where
    D: IntoIterator<Item = sluice_client::DeliveryFuture> + Send + 'static,
    D::IntoIter: Send,
{
    let (tx, mut rx) = mpsc::channel::<(Instant, D)>(COLLECTOR_QUEUE_MAX);
    let collector = tokio::spawn(async move {
        while let Some((due, deliveries)) = rx.recv().await {
            for delivery in deliveries {
                match delivery.await {
                    Ok(_) if !stamp_values => recorder.record(value_bytes, due.elapsed()),
                    Ok(_) => {}
                    Err(error) => recorder.error(error.to_string()),
                }
            }
        }
    });
    (tx, collector)
}

/// The record with its key (or partition) as the workload says.
fn keyed(
    record: ProducerRecord,
    workload: &Workload,
    index: usize,
    rng: &mut rand::rngs::StdRng,
    zipf: Option<&Zipf>,
) -> ProducerRecord {
    match workload.keys {
        Keys::None => record.with_partition(index as u32 % workload.partitions.max(1)),
        Keys::Uniform => record.with_key(format!(
            "key-{}",
            rng.gen_range(0..workload.key_space.max(1))
        )),
        Keys::Zipfian => {
            record.with_key(format!("key-{}", zipf.map(|z| z.sample(rng)).unwrap_or(0)))
        }
    }
}

/// The value, with the send time (µs since the epoch) in its first 8 bytes for e2e.
fn stamped(value: &Bytes, stamp: bool) -> Bytes {
    if !stamp || value.len() < 8 {
        return value.clone();
    }
    let mut out = BytesMut::with_capacity(value.len());
    out.put_u64_le(now_micros());
    out.extend_from_slice(&value[8..]);
    out.freeze()
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

async fn prefill(client: &Client, topics: &[String], workload: &Workload) -> Result<(), String> {
    let config = ProducerConfig {
        max_in_flight: 8,
        ..workload.producer_config()?
    };
    let producer = Producer::new(client.clone(), config);
    let mut values = ValuePool::new(workload.values, workload.message_bytes, 99);
    let partitions = workload.partitions.max(1);
    eprintln!(
        "prefilling {} records of {} B...",
        workload.prefill_records, workload.message_bytes
    );
    for i in 0..workload.prefill_records {
        let topic = topics[(i as usize) % topics.len()].as_str();
        let record = ProducerRecord::new(topic, values.next().clone())
            .with_partition((i % u64::from(partitions)) as u32);
        producer
            .send_detached(record)
            .await
            .map_err(|e| e.to_string())?;
    }
    producer.flush().await.map_err(|e| e.to_string())?;
    producer.close().await.map_err(|e| e.to_string())
}

async fn consumer_task(
    client: Client,
    topics: Vec<String>,
    index: usize,
    workload: Workload,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
    kind: Kind,
) -> Result<(), String> {
    let config = ConsumerConfig {
        max_wait: Duration::from_millis(100),
        fetches_in_flight: workload.fetches_in_flight,
        start: if kind == Kind::E2e {
            SeekTo::End
        } else {
            SeekTo::Beginning
        },
        ..ConsumerConfig::default()
    };
    let mut consumer = Consumer::new(client, config);
    let consumers = workload.consumers.max(1);
    let mine: Vec<u32> = (0..workload.partitions.max(1))
        .filter(|p| *p as usize % consumers == index % consumers)
        .collect();
    if mine.is_empty() {
        return Ok(());
    }
    for topic in &topics {
        consumer
            .assign(topic, &mine)
            .await
            .map_err(|e| e.to_string())?;
    }
    while !stop.load(Ordering::Relaxed) {
        let asked = Instant::now();
        let fetched = tokio::select! {
            fetched = consumer.next_batches() => fetched,
            _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
        };
        let batches = match fetched {
            Ok(batches) => batches,
            Err(error) => {
                recorder.error(error.to_string());
                continue;
            }
        };
        let waited = asked.elapsed();
        for fetched in batches {
            let first = fetched.first_offset.max(fetched.batch.header.base_offset);
            let records = fetched.batch.header.next_offset().saturating_sub(first);
            if kind == Kind::E2e {
                let now = now_micros();
                for record in fetched.records().flatten() {
                    let sent = record
                        .value
                        .as_ref()
                        .filter(|v| v.len() >= 8)
                        .map(|v| u64::from_le_bytes(v[..8].try_into().unwrap_or_default()));
                    let latency = Duration::from_micros(now.saturating_sub(sent.unwrap_or(now)));
                    recorder.record(record.value.as_ref().map(Bytes::len).unwrap_or(0), latency);
                }
            } else {
                let bytes = fetched.batch.frame.len() * records as usize
                    / fetched.batch.header.record_count.max(1) as usize;
                recorder.record_many(records, bytes, waited);
            }
        }
    }
    let stats = consumer.stats();
    eprintln!(
        "consumer {index}: {} fetches ({} pipelined pieces, {} dropped), up to {} in flight per shard",
        stats.fetches, stats.pieces, stats.pieces_dropped, stats.in_flight_max
    );
    Ok(())
}
