//! [`Producer`]: per-partition batching, pipelined produce requests, retries and
//! backpressure.
//!
//! How a record travels: [`Producer::send`] picks the partition, reserves buffer
//! space (waiting when [`ProducerConfig::buffer_bytes`] is used up — that wait is
//! the backpressure), and encodes the record straight into the partition's open
//! batch. A batch is sealed when it reaches [`ProducerConfig::batch_bytes`] or
//! [`ProducerConfig::linger`] after its first record. A background sender task
//! gathers the sealed batches of every partition owned by the same broker shard
//! into one produce request on that shard's connection, with at most
//! [`ProducerConfig::max_in_flight`] requests outstanding per partition.
//!
//! Cost per record: the record bytes are copied once into the batch buffer; the
//! returned [`DeliveryFuture`] is an `Arc` to the batch's shared result slot plus
//! the record's index — no channel or allocation per record, and dropping it
//! costs one reference-count decrement.
//!
//! Retries: a batch that fails with a retriable error goes back to the front of
//! its partition queue and is resent after an exponential backoff with ±20 %
//! jitter, until [`ProducerConfig::delivery_timeout`] after it was sealed.
//! Ordering guarantee: within a partition, records are appended in `send` order,
//! and a batch waiting for a retry holds back every later batch of its partition
//! that was not yet sent. Batches already in flight when an earlier one fails may
//! land before the retried one; set `max_in_flight = 1` for strict ordering under
//! retries (as with Kafka without idempotence).
//!
//! Idempotence ([`ProducerConfig::idempotent`], on by default with acks 1 or
//! all): the first `send` gets a producer id from the broker (InitProducerId; a
//! broker that does not know the request makes the producer fall back to plain
//! produce). Each batch is stamped, when it is sealed, with the producer id, its
//! epoch and the partition's next base sequence (sequences count records from 0
//! and wrap at `i32::MAX`). A retry resends the very same frame, so it carries
//! the same sequence, and the broker answers a duplicate of one of the
//! producer's last 16 batches of a partition with its original offset instead of
//! appending it again. To keep every retry inside that window, at most 16 batches
//! per partition are in flight, and a batch that is retried goes out alone (its
//! answer's base offset is then its own). A batch refused with
//! `OutOfOrderSequence` while an earlier batch of its partition is still being
//! retried is retried after it (the refusal only says the earlier one is
//! missing); otherwise the error is final and reported to the batch's records
//! ([`Error::OutOfOrderSequence`]). A gap that way (e.g. an earlier batch failed
//! after its delivery timeout) is not repaired: the partition's later batches
//! fail the same way until a new producer is created.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::hash::BuildHasherDefault;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use sluice_schema::BATCH_BYTES_MAX;
use tokio::sync::{Notify, Semaphore, TryAcquireError};
use tokio::task::JoinHandle;

use crate::batch::{
    next_sequence, BatchBuilder, BufferPool, Compression, Header, ProducerStamp, HEADER_BYTES,
};
use crate::client::{partition_error, unexpected, Client, Target, TopicRoute};
use crate::error::{Code, Error, Result};
use crate::groups::ProducerIdentity;
use crate::latency::{LatencyHistogram, LatencySnapshot};
use crate::partitioner::{partition_for_key, NullKeyPolicy};
use crate::request::{ProducePartitionRange, ProduceTopicRanges, RequestBody};
use crate::response::ResponseBody;

/// How many acknowledgements a produce request waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Acks {
    /// No response at all; a record counts as delivered once written to the socket.
    None,
    /// The leader has the batch durable.
    Leader,
    /// All in-sync replicas have it durable (single node: same as `Leader`).
    #[default]
    All,
}

impl Acks {
    /// The wire value (0, 1, -1).
    pub fn to_wire(self) -> i8 {
        match self {
            Acks::None => 0,
            Acks::Leader => 1,
            Acks::All => -1,
        }
    }
}

/// Producer settings.
#[derive(Debug, Clone)]
#[must_use]
pub struct ProducerConfig {
    /// Acknowledgement level.
    pub acks: Acks,
    /// A batch is sealed once it holds this many bytes.
    pub batch_bytes: usize,
    /// A batch is sealed at the latest this long after its first record.
    pub linger: Duration,
    /// Produce requests outstanding per partition.
    pub max_in_flight: usize,
    /// A record fails if not acknowledged this long after its batch was sealed.
    pub delivery_timeout: Duration,
    /// First retry backoff; doubles per attempt.
    pub retry_backoff: Duration,
    /// Largest retry backoff.
    pub retry_backoff_max: Duration,
    /// Partition choice for records with neither key nor partition.
    pub partitioner: NullKeyPolicy,
    /// With [`NullKeyPolicy::Sticky`]: bytes of keyless records sent to one
    /// partition before the producer moves to another (KIP-794's switch point;
    /// at most `batch_bytes`).
    pub sticky_bytes: usize,
    /// Bytes of records buffered (unacknowledged) before `send` waits.
    pub buffer_bytes: usize,
    /// Largest payload of one produce request.
    pub request_bytes_max: usize,
    /// Idempotent produce (with acks 1 or all): retries never duplicate
    /// records. See the module documentation.
    pub idempotent: bool,
    /// Codec each batch's records are compressed with when it is sealed
    /// (`batch_bytes` counts uncompressed bytes). The broker stores and serves
    /// batches as they come; consumers decompress.
    pub compression: Compression,
}

/// Batches of one partition in flight at once when idempotent: the broker
/// recognizes a duplicate among the producer's last 16 batches of a partition.
pub const IDEMPOTENT_BATCHES_IN_FLIGHT_MAX: usize = 16;

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            acks: Acks::All,
            batch_bytes: 64 * 1024,
            linger: Duration::from_millis(1),
            max_in_flight: 5,
            delivery_timeout: Duration::from_secs(120),
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(1),
            partitioner: NullKeyPolicy::Sticky,
            sticky_bytes: 16 * 1024,
            buffer_bytes: 64 * 1024 * 1024,
            request_bytes_max: 8 * 1024 * 1024,
            idempotent: true,
            compression: Compression::None,
        }
    }
}

/// A record to send.
#[derive(Debug, Clone, Default)]
pub struct ProducerRecord {
    /// Topic.
    pub topic: Arc<str>,
    /// Explicit partition; `None` = by key hash, or the null-key policy.
    pub partition: Option<u32>,
    /// Key.
    pub key: Option<Bytes>,
    /// Value.
    pub value: Option<Bytes>,
    /// Headers.
    pub headers: Vec<Header>,
    /// Timestamp; `None` = now.
    pub timestamp_ms: Option<i64>,
}

impl ProducerRecord {
    /// A record with a value and no key.
    pub fn new(topic: impl Into<Arc<str>>, value: impl Into<Bytes>) -> ProducerRecord {
        ProducerRecord {
            topic: topic.into(),
            value: Some(value.into()),
            ..ProducerRecord::default()
        }
    }

    /// Sets the key.
    pub fn with_key(mut self, key: impl Into<Bytes>) -> ProducerRecord {
        self.key = Some(key.into());
        self
    }

    /// Sets the partition.
    pub fn with_partition(mut self, partition: u32) -> ProducerRecord {
        self.partition = Some(partition);
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, key: impl Into<String>, value: Option<Bytes>) -> ProducerRecord {
        self.headers.push((key.into(), value));
        self
    }

    /// Sets the timestamp.
    pub fn with_timestamp(mut self, timestamp_ms: i64) -> ProducerRecord {
        self.timestamp_ms = Some(timestamp_ms);
        self
    }
}

/// Where an acknowledged record was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMetadata {
    /// Topic.
    pub topic: Arc<str>,
    /// Partition.
    pub partition: u32,
    /// Offset; `None` with [`Acks::None`] (the broker does not answer).
    pub offset: Option<u64>,
    /// The record's timestamp.
    pub timestamp_ms: i64,
}

/// The shared outcome of one batch: the base offset (or `None` for acks=0), or
/// the error every record of the batch gets.
struct BatchSlot {
    topic: Arc<str>,
    partition: u32,
    state: Mutex<SlotState>,
    done: AtomicBool,
}

#[derive(Default)]
struct SlotState {
    outcome: Option<Result<Option<u64>>>,
    wakers: Vec<Waker>,
}

impl BatchSlot {
    fn new(topic: Arc<str>, partition: u32) -> Arc<BatchSlot> {
        Arc::new(BatchSlot {
            topic,
            partition,
            state: Mutex::new(SlotState::default()),
            done: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn complete(&self, outcome: Result<Option<u64>>) {
        let wakers = {
            let mut state = self.lock();
            if state.outcome.is_some() {
                return;
            }
            state.outcome = Some(outcome);
            std::mem::take(&mut state.wakers)
        };
        self.done.store(true, Ordering::Release);
        wakers.into_iter().for_each(Waker::wake);
    }

    fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    fn poll_outcome(&self, cx: &mut Context<'_>) -> Poll<Result<Option<u64>>> {
        let mut state = self.lock();
        if let Some(outcome) = &state.outcome {
            return Poll::Ready(outcome.clone());
        }
        if !state.wakers.iter().any(|waker| waker.will_wake(cx.waker())) {
            state.wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// Resolves when the record is acknowledged (or fails). Dropping it is free: the
/// record is still delivered.
pub struct DeliveryFuture {
    slot: Arc<BatchSlot>,
    index: u32,
    timestamp_ms: i64,
}

impl std::fmt::Debug for DeliveryFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryFuture")
            .field("topic", &self.slot.topic)
            .field("partition", &self.slot.partition)
            .field("index", &self.index)
            .finish()
    }
}

impl DeliveryFuture {
    /// The partition the record was assigned to.
    pub fn partition(&self) -> u32 {
        self.slot.partition
    }
}

impl Future for DeliveryFuture {
    type Output = Result<RecordMetadata>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        this.slot.poll_outcome(cx).map(|outcome| {
            outcome.map(|base_offset| RecordMetadata {
                topic: this.slot.topic.clone(),
                partition: this.slot.partition,
                offset: base_offset.map(|base| base + u64::from(this.index)),
                timestamp_ms: this.timestamp_ms,
            })
        })
    }
}

struct SlotWait(Arc<BatchSlot>);

impl Future for SlotWait {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.0.poll_outcome(cx).map(|_| ())
    }
}

struct OpenBatch {
    builder: BatchBuilder,
    slot: Arc<BatchSlot>,
    opened: Instant,
    reserved_bytes: usize,
}

struct SealedBatch {
    frame: Bytes,
    slot: Arc<BatchSlot>,
    /// Local order of the batch in its partition (not the wire sequence).
    sequence: u64,
    /// Stamped with a producer id and base sequence.
    idempotent: bool,
    record_count: u32,
    sealed: Instant,
    attempts: u32,
    retry_at: Option<Instant>,
    reserved_bytes: usize,
    /// Sent while an earlier batch of its partition was unsettled: it may reach
    /// the broker first (another connection, a shard hop), so an
    /// OutOfOrderSequence for it is retried.
    sent_behind: bool,
}

#[derive(Default)]
struct PartitionQueue {
    open: Option<OpenBatch>,
    ready: VecDeque<SealedBatch>,
    /// Produce requests in flight with batches of this partition.
    in_flight: usize,
    /// Batches in flight (idempotent produce bounds them).
    in_flight_batches: usize,
    next_sequence: u64,
    /// Who stamps this partition's batches (`None`: not idempotent).
    identity: Option<ProducerIdentity>,
    /// Wire sequence of the next sealed batch's first record.
    next_base_sequence: i32,
    /// Local sequences of idempotent batches sealed and not yet settled.
    unsettled: BTreeSet<u64>,
}

impl PartitionQueue {
    /// Seals the open batch (if any) into the ready queue.
    fn seal(&mut self, now: Instant) {
        let Some(open) = self.open.take() else {
            return;
        };
        let record_count = open.builder.record_count();
        let stamp = self.identity.map(|identity| ProducerStamp {
            producer_id: identity.producer_id,
            producer_epoch: identity.producer_epoch,
            base_sequence: self.next_base_sequence,
        });
        match open.builder.finish_stamped(stamp) {
            Ok(frame) => {
                let sequence = self.next_sequence;
                self.next_sequence += 1;
                if stamp.is_some() {
                    self.next_base_sequence = next_sequence(self.next_base_sequence, record_count);
                    self.unsettled.insert(sequence);
                }
                self.ready.push_back(SealedBatch {
                    frame,
                    slot: open.slot,
                    sequence,
                    idempotent: stamp.is_some(),
                    record_count,
                    sealed: now,
                    attempts: 0,
                    retry_at: None,
                    reserved_bytes: open.reserved_bytes,
                    sent_behind: false,
                });
            }
            // Only an empty batch fails to finish; nobody waits on its slot.
            Err(error) => open.slot.complete(Err(error)),
        }
    }

    fn requeue(&mut self, batch: SealedBatch) {
        let position = self
            .ready
            .iter()
            .position(|queued| queued.sequence > batch.sequence);
        self.ready
            .insert(position.unwrap_or(self.ready.len()), batch);
    }

    fn is_idle(&self) -> bool {
        self.open.is_none() && self.ready.is_empty() && self.in_flight == 0
    }

    /// Whether an idempotent batch earlier than `sequence` is still unsettled
    /// (in flight or waiting for a retry).
    fn earlier_unsettled(&self, sequence: u64) -> bool {
        self.unsettled.range(..sequence).next().is_some()
    }
}

/// Whether a record of `reserve` bytes fits the partition's open batch (or there
/// is no open batch, or it is empty).
fn fits(queue: &PartitionQueue, reserve: usize, batch_bytes: usize) -> bool {
    queue
        .open
        .as_ref()
        .is_none_or(|open| open.builder.is_empty() || open.builder.bytes() + reserve <= batch_bytes)
}

struct TopicState {
    route: Arc<TopicRoute>,
    partitions: Vec<PartitionQueue>,
    /// The partition keyless records go to now (sticky policy).
    sticky: u32,
    /// Bytes of keyless records sent to it since the producer moved there.
    sticky_sent: usize,
    round_robin: u32,
    /// The route's leaders proved stale (NotLeader, a dead connection, no leader
    /// known): the sender fetches metadata again before sending more.
    stale: bool,
    refreshing: bool,
}

#[derive(Default)]
struct State {
    /// Looked up once per record: FNV-1a over the (short) topic name instead of
    /// SipHash.
    topics: HashMap<Arc<str>, TopicState, BuildHasherDefault<Fnv1a>>,
    outstanding: Vec<Arc<BatchSlot>>,
    outstanding_pruned_len: usize,
}

struct Shared {
    client: Client,
    config: ProducerConfig,
    /// The producer id, fetched on first use (`None` inside: not idempotent).
    identity: tokio::sync::OnceCell<Option<ProducerIdentity>>,
    state: Mutex<State>,
    wake: Notify,
    buffer: Semaphore,
    /// Batch buffers to build in again (as many as the buffer can fill).
    pool: BufferPool,
    closing: AtomicBool,
    stats: Stats,
}

/// What the producer's requests did (see [`ProducerStats`]).
#[derive(Debug, Default)]
struct Stats {
    request_latency: LatencyHistogram,
    queue_time: LatencyHistogram,
    requests_failed: AtomicU64,
    batches_retried: AtomicU64,
    last_retry_error: Mutex<Option<String>>,
}

/// What a producer's requests did since it was created ([`Producer::stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerStats {
    /// From a produce request being handed to its connection until its answer
    /// (acks=0: until it is written to the socket), failed ones included; one
    /// value per request, whatever the batches in it.
    pub request_latency: LatencySnapshot,
    /// From a batch being sealed until the request carrying it was sent
    /// (per batch, retries counted again from the seal).
    pub queue_time: LatencySnapshot,
    /// Produce requests that failed as a whole (connection, timeout).
    pub requests_failed: u64,
    /// Batches sent again after a retriable error (of their request or their
    /// partition), each retry counted.
    pub batches_retried: u64,
    /// The error of the latest retry, if any.
    pub last_retry_error: Option<String>,
}

impl ProducerStats {
    /// Adds `other`'s (another producer's) to these.
    pub fn merge(&mut self, other: &ProducerStats) {
        self.request_latency.merge(&other.request_latency);
        self.queue_time.merge(&other.queue_time);
        self.requests_failed += other.requests_failed;
        self.batches_retried += other.batches_retried;
        if other.last_retry_error.is_some() {
            self.last_retry_error.clone_from(&other.last_retry_error);
        }
    }

    /// What happened since `earlier` (a snapshot of the same producer).
    pub fn since(&self, earlier: &ProducerStats) -> ProducerStats {
        ProducerStats {
            request_latency: self.request_latency.since(&earlier.request_latency),
            queue_time: self.queue_time.since(&earlier.queue_time),
            requests_failed: self.requests_failed.saturating_sub(earlier.requests_failed),
            batches_retried: self.batches_retried.saturating_sub(earlier.batches_retried),
            last_retry_error: self.last_retry_error.clone(),
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn release(&self, bytes: usize) {
        if bytes > 0 {
            self.buffer.add_permits(bytes);
        }
    }
}

/// A batching, pipelining producer. Create it inside a tokio runtime (it spawns
/// its sender task). Share it between tasks with an `Arc`.
pub struct Producer {
    shared: Arc<Shared>,
    sender: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("config", &self.shared.config)
            .finish()
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        // The sender task drains what is buffered, then exits.
        self.shared.closing.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }
}

impl Producer {
    /// A producer over `client`.
    pub fn new(client: Client, config: ProducerConfig) -> Producer {
        let mut config = config;
        config.batch_bytes = config.batch_bytes.clamp(HEADER_BYTES + 1, BATCH_BYTES_MAX);
        config.max_in_flight = config.max_in_flight.max(1);
        config.buffer_bytes = config.buffer_bytes.max(config.batch_bytes);
        let shared = Arc::new(Shared {
            client,
            identity: tokio::sync::OnceCell::new(),
            buffer: Semaphore::new(config.buffer_bytes),
            pool: BufferPool::new((config.buffer_bytes / config.batch_bytes).clamp(2, 256)),
            config,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            closing: AtomicBool::new(false),
            stats: Stats::default(),
        });
        let sender = tokio::spawn(run_sender(shared.clone()));
        Producer {
            shared,
            sender: Mutex::new(Some(sender)),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &ProducerConfig {
        &self.shared.config
    }

    /// Request latency and batch queueing time since the producer was created
    /// (Kafka's `request-latency` and `record-queue-time` metrics).
    pub fn stats(&self) -> ProducerStats {
        let stats = &self.shared.stats;
        ProducerStats {
            request_latency: stats.request_latency.snapshot(),
            queue_time: stats.queue_time.snapshot(),
            requests_failed: stats.requests_failed.load(Ordering::Relaxed),
            batches_retried: stats.batches_retried.load(Ordering::Relaxed),
            last_retry_error: stats
                .last_retry_error
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone(),
        }
    }

    /// Queues a record. Waits only while the buffer is full (backpressure) or the
    /// topic's metadata is fetched for the first time. The returned future
    /// resolves when the record is acknowledged.
    pub async fn send(&self, record: ProducerRecord) -> Result<DeliveryFuture> {
        if self.shared.closing.load(Ordering::Acquire) {
            return Err(Error::ProducerClosed);
        }
        let reserve = BatchBuilder::record_bytes_max(
            record.key.as_deref(),
            record.value.as_deref(),
            &record.headers,
        );
        let limit = BATCH_BYTES_MAX.min(self.shared.config.buffer_bytes);
        if reserve + HEADER_BYTES > limit {
            return Err(Error::RecordTooLarge {
                bytes: reserve + HEADER_BYTES,
                bytes_max: limit,
            });
        }
        let identity = self.identity().await?;
        self.reserve(reserve).await?;
        let timestamp_ms = record.timestamp_ms.unwrap_or_else(now_ms);
        let result = self
            .append_or_route(&record, timestamp_ms, reserve, identity)
            .await;
        if result.is_err() {
            self.shared.release(reserve);
        }
        result
    }

    /// Queues many records at once, in order, and returns a delivery future for
    /// each. The same as calling [`Producer::send`] for each record, for a
    /// fraction of its cost per record: the state lock, the buffer reservation
    /// and the clock (records without a timestamp get the time of the call) are
    /// taken once per call (per run of records that fit half the buffer), not
    /// once per record. The records are borrowed (their bytes are copied into
    /// batches), so a caller can fill the same `Vec` again for its next call.
    ///
    /// Every record's size is checked first: if one is too large, nothing is
    /// queued and that is the error. An error met while appending (an unknown
    /// partition, a closed producer) leaves the records before it queued.
    pub async fn send_many(&self, records: &[ProducerRecord]) -> Result<Vec<DeliveryFuture>> {
        let mut deliveries = Vec::with_capacity(records.len());
        self.send_many_into(records, Some(&mut deliveries)).await?;
        Ok(deliveries)
    }

    /// [`Producer::send_many`] without delivery futures (no per-record handle at
    /// all): for loads where only [`Producer::flush`] matters. Delivery failures
    /// are not reported.
    pub async fn send_many_detached(&self, records: &[ProducerRecord]) -> Result<()> {
        self.send_many_into(records, None).await
    }

    async fn send_many_into(
        &self,
        records: &[ProducerRecord],
        mut deliveries: Option<&mut Vec<DeliveryFuture>>,
    ) -> Result<()> {
        if self.shared.closing.load(Ordering::Acquire) {
            return Err(Error::ProducerClosed);
        }
        let limit = BATCH_BYTES_MAX.min(self.shared.config.buffer_bytes);
        let reserves: Vec<usize> = records
            .iter()
            .map(|record| {
                BatchBuilder::record_bytes_max(
                    record.key.as_deref(),
                    record.value.as_deref(),
                    &record.headers,
                )
            })
            .collect();
        if let Some(&largest) = reserves.iter().max() {
            if largest + HEADER_BYTES > limit {
                return Err(Error::RecordTooLarge {
                    bytes: largest + HEADER_BYTES,
                    bytes_max: limit,
                });
            }
        }
        let identity = self.identity().await?;
        let timestamp_ms = now_ms();
        // Reserve buffer space for a run of records at a time: at most half the
        // buffer, so a run never waits for space it holds itself.
        let run_bytes_max = (self.shared.config.buffer_bytes / 2).max(1);
        let mut start = 0;
        while start < records.len() {
            let mut end = start;
            let mut run_bytes = 0;
            while end < records.len()
                && (end == start || run_bytes + reserves[end] <= run_bytes_max)
            {
                run_bytes += reserves[end];
                end += 1;
            }
            self.reserve(run_bytes).await?;
            let mut done = start;
            while done < end {
                let appended = self.try_append_run(
                    &records[done..end],
                    &reserves[done..end],
                    timestamp_ms,
                    deliveries.as_deref_mut(),
                );
                match appended {
                    Ok(count) => done += count,
                    Err((count, error)) => {
                        let unused: usize = reserves[done + count..end].iter().sum();
                        self.shared.release(unused);
                        return Err(error);
                    }
                }
                if done < end {
                    // The topic of `records[done]` is not known yet.
                    if let Err(error) = self.learn_topic(&records[done].topic, identity).await {
                        self.shared.release(reserves[done..end].iter().sum());
                        return Err(error);
                    }
                }
            }
            start = end;
        }
        Ok(())
    }

    /// [`Producer::send`] without a delivery future: for fire-and-forget loads
    /// (benchmarks) where only [`Producer::flush`] matters. Delivery failures are
    /// not reported.
    pub async fn send_detached(&self, record: ProducerRecord) -> Result<()> {
        self.send(record).await.map(drop)
    }

    /// The producer id batches are stamped with: fetched once (InitProducerId);
    /// `None` when not idempotent (configured so, acks 0, or a broker that does
    /// not know the request).
    pub async fn identity(&self) -> Result<Option<ProducerIdentity>> {
        let config = &self.shared.config;
        if !config.idempotent || config.acks == Acks::None {
            return Ok(None);
        }
        let client = &self.shared.client;
        let identity = self
            .shared
            .identity
            .get_or_try_init(|| async {
                match client.init_producer_id().await {
                    Ok(identity) => {
                        tracing::debug!(?identity, "idempotent producer");
                        Ok(Some(identity))
                    }
                    Err(error) if error.code() == Some(Code::UnknownRequestKind) => {
                        tracing::warn!(
                            "the broker does not support idempotent produce; producing without it"
                        );
                        Ok(None)
                    }
                    Err(error) => Err(error),
                }
            })
            .await?;
        Ok(*identity)
    }

    async fn reserve(&self, bytes: usize) -> Result<()> {
        let permits = bytes as u32;
        match self.shared.buffer.try_acquire_many(permits) {
            Ok(permit) => permit.forget(),
            Err(TryAcquireError::NoPermits) => {
                // The buffer is full: open batches cannot grow until acknowledgements
                // free space, so lingering would only add delay. Send them now.
                self.seal_open_batches();
                let permit = self.shared.buffer.acquire_many(permits).await;
                permit.map_err(|_| Error::ProducerClosed)?.forget();
            }
            Err(TryAcquireError::Closed) => return Err(Error::ProducerClosed),
        }
        Ok(())
    }

    fn seal_open_batches(&self) {
        let now = Instant::now();
        {
            let mut state = self.shared.lock();
            for topic in state.topics.values_mut() {
                for queue in topic.partitions.iter_mut() {
                    if queue
                        .open
                        .as_ref()
                        .is_some_and(|open| !open.builder.is_empty())
                    {
                        queue.seal(now);
                    }
                }
            }
        }
        self.shared.wake.notify_one();
    }

    async fn append_or_route(
        &self,
        record: &ProducerRecord,
        timestamp_ms: i64,
        reserve: usize,
        identity: Option<ProducerIdentity>,
    ) -> Result<DeliveryFuture> {
        loop {
            if let Some(delivery) = self.try_append(record, timestamp_ms, reserve)? {
                return Ok(delivery);
            }
            self.learn_topic(&record.topic, identity).await?;
        }
    }

    /// Fetches the route of a topic this producer has not sent to yet and sets up
    /// its partition queues.
    async fn learn_topic(&self, name: &str, identity: Option<ProducerIdentity>) -> Result<()> {
        let route = self.shared.client.topic_route(name, false).await?;
        let mut state = self.shared.lock();
        let partitions = (0..route.partition_count())
            .map(|_| PartitionQueue {
                identity,
                ..PartitionQueue::default()
            })
            .collect();
        state
            .topics
            .entry(route.name.clone())
            .or_insert(TopicState {
                route: route.clone(),
                partitions,
                sticky: rand::random::<u32>() % route.partition_count().max(1),
                sticky_sent: 0,
                round_robin: 0,
                stale: false,
                refreshing: false,
            });
        Ok(())
    }

    /// Appends under the state lock; `Ok(None)` when the topic is not known yet.
    fn try_append(
        &self,
        record: &ProducerRecord,
        timestamp_ms: i64,
        reserve: usize,
    ) -> Result<Option<DeliveryFuture>> {
        let mut guard = self.shared.lock();
        let state = &mut *guard;
        let Some(topic) = state.topics.get_mut(&*record.topic) else {
            return Ok(None);
        };
        let mut appending = Appending::new(&self.shared);
        let delivery = appending.append(
            topic,
            &mut state.outstanding,
            record,
            timestamp_ms,
            reserve,
            true,
        )?;
        drop(guard);
        if appending.wake {
            self.shared.wake.notify_one();
        }
        Ok(delivery)
    }

    /// Appends a run of records under one hold of the state lock, looking each
    /// topic up once per run of records of the same topic. Returns how many were
    /// appended: all of them, or fewer when a record's topic is not known yet
    /// (it is the next one). `Err` carries how many were appended before the
    /// failing record.
    fn try_append_run(
        &self,
        records: &[ProducerRecord],
        reserves: &[usize],
        now_ms: i64,
        mut deliveries: Option<&mut Vec<DeliveryFuture>>,
    ) -> std::result::Result<usize, (usize, Error)> {
        let mut appending = Appending::new(&self.shared);
        let mut done = 0;
        let outcome = {
            let mut guard = self.shared.lock();
            let State {
                topics,
                outstanding,
                ..
            } = &mut *guard;
            loop {
                let Some(first) = records.get(done) else {
                    break Ok(());
                };
                let Some(topic) = topics.get_mut(&*first.topic) else {
                    break Ok(());
                };
                let failed = records[done..]
                    .iter()
                    .zip(&reserves[done..])
                    .take_while(|(record, _)| {
                        Arc::ptr_eq(&record.topic, &first.topic) || record.topic == first.topic
                    })
                    .try_for_each(|(record, reserve)| {
                        let timestamp_ms = record.timestamp_ms.unwrap_or(now_ms);
                        let delivery = appending.append(
                            topic,
                            outstanding,
                            record,
                            timestamp_ms,
                            *reserve,
                            deliveries.is_some(),
                        )?;
                        if let (Some(deliveries), Some(delivery)) =
                            (deliveries.as_deref_mut(), delivery)
                        {
                            deliveries.push(delivery);
                        }
                        done += 1;
                        Ok(())
                    });
                if let Err(error) = failed {
                    break Err(error);
                }
            }
        };
        if appending.wake {
            self.shared.wake.notify_one();
        }
        outcome.map(|()| done).map_err(|error| (done, error))
    }

    /// Sends everything buffered now and waits until those records are
    /// acknowledged or failed (failures are reported by their futures).
    pub async fn flush(&self) -> Result<()> {
        let slots = {
            let mut state = self.shared.lock();
            let now = Instant::now();
            for topic in state.topics.values_mut() {
                topic
                    .partitions
                    .iter_mut()
                    .for_each(|queue| queue.seal(now));
            }
            state.outstanding.retain(|slot| !slot.is_done());
            state.outstanding.clone()
        };
        self.shared.wake.notify_one();
        for slot in slots {
            SlotWait(slot).await;
        }
        Ok(())
    }

    /// Flushes, then stops the sender task. Later `send`s fail with
    /// [`Error::ProducerClosed`].
    pub async fn close(&self) -> Result<()> {
        self.flush().await?;
        self.shared.closing.store(true, Ordering::Release);
        self.shared.wake.notify_one();
        let sender = self.sender.lock().ok().and_then(|mut sender| sender.take());
        if let Some(sender) = sender {
            let _ = sender.await;
        }
        Ok(())
    }
}

/// FNV-1a, for the producer's topic map (names come from the application; the
/// map is the producer's own, so flooding it only slows that producer).
#[derive(Default)]
struct Fnv1a(u64);

impl std::hash::Hasher for Fnv1a {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut hash = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for byte in bytes {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = hash;
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0)
}

fn choose_partition(
    topic: &mut TopicState,
    record: &ProducerRecord,
    policy: NullKeyPolicy,
) -> Result<u32> {
    let count = topic.route.partition_count();
    if let Some(partition) = record.partition {
        if partition >= count {
            return Err(Error::UnknownPartition {
                topic: record.topic.to_string(),
                partition,
            });
        }
        return Ok(partition);
    }
    if let Some(key) = &record.key {
        return Ok(partition_for_key(key, count));
    }
    Ok(match policy {
        NullKeyPolicy::Sticky => topic.sticky % count,
        NullKeyPolicy::RoundRobin => {
            topic.round_robin = topic.round_robin.wrapping_add(1);
            topic.round_robin % count
        }
    })
}

/// One hold of the state lock appending records: reads the clock at most once
/// (only when a batch opens or seals) and remembers whether the sender must be
/// woken.
struct Appending<'a> {
    config: &'a ProducerConfig,
    pool: &'a BufferPool,
    now: Option<Instant>,
    wake: bool,
}

impl<'a> Appending<'a> {
    fn new(shared: &'a Shared) -> Appending<'a> {
        Appending {
            config: &shared.config,
            pool: &shared.pool,
            now: None,
            wake: false,
        }
    }

    fn now(&mut self) -> Instant {
        *self.now.get_or_insert_with(Instant::now)
    }

    /// Appends `record` to its partition of `topic`: picks the partition, seals
    /// the open batch if the record does not fit, opens one if there is none,
    /// encodes the record and seals the batch once full. Returns the record's
    /// delivery future if `deliver`.
    fn append(
        &mut self,
        topic: &mut TopicState,
        outstanding: &mut Vec<Arc<BatchSlot>>,
        record: &ProducerRecord,
        timestamp_ms: i64,
        reserve: usize,
        deliver: bool,
    ) -> Result<Option<DeliveryFuture>> {
        let (config, pool) = (self.config, self.pool);
        let mut partition = choose_partition(topic, record, config.partitioner)?;
        let sticky = record.partition.is_none()
            && record.key.is_none()
            && config.partitioner == NullKeyPolicy::Sticky;
        if sticky && topic.sticky_sent >= config.sticky_bytes.min(config.batch_bytes) {
            // Uniform sticky partitioning (KIP-794): move on after a fixed number
            // of bytes, whatever sealed the batches, to the least loaded partition.
            topic.sticky = next_sticky(topic, config.batch_bytes);
            topic.sticky_sent = 0;
            partition = topic.sticky;
        }
        if !fits(
            &topic.partitions[partition as usize],
            reserve,
            config.batch_bytes,
        ) {
            let now = self.now();
            topic.partitions[partition as usize].seal(now);
            self.wake = true;
        }
        if topic.partitions[partition as usize].open.is_none() {
            self.wake = true;
            let opened = self.now();
            let slot = BatchSlot::new(topic.route.name.clone(), partition);
            outstanding.push(slot.clone());
            let mut builder =
                BatchBuilder::pooled(pool, config.batch_bytes.max(reserve + HEADER_BYTES));
            builder.set_compression(config.compression);
            topic.partitions[partition as usize].open = Some(OpenBatch {
                builder,
                slot,
                opened,
                reserved_bytes: 0,
            });
        }
        let queue = &mut topic.partitions[partition as usize];
        let Some(open) = queue.open.as_mut() else {
            return Err(Error::InvalidArgument("no open batch".into()));
        };
        let index = open.builder.append_sized(
            timestamp_ms,
            record.key.as_deref(),
            record.value.as_deref(),
            &record.headers,
            reserve,
        )?;
        open.reserved_bytes += reserve;
        let delivery = deliver.then(|| DeliveryFuture {
            slot: open.slot.clone(),
            index,
            timestamp_ms,
        });
        if open.builder.bytes() >= config.batch_bytes {
            let now = self.now();
            queue.seal(now);
            self.wake = true;
        }
        if sticky {
            topic.sticky_sent += reserve;
        }
        Ok(delivery)
    }
}

/// The partition keyless records move to when the sticky one has had its share:
/// the one with the fewest bytes waiting to be sent (as KIP-794 weighs
/// partitions by their queues: a slow or unavailable partition, whose requests
/// in flight are at their limit, queues up and is avoided), the first after the
/// current one in turn on a tie (so partitions that keep up take turns and get
/// even shares). Queues are compared in whole batches: a partition is passed
/// over only when it is at least a batch further behind.
fn next_sticky(topic: &TopicState, batch_bytes: usize) -> u32 {
    let count = topic.route.partition_count().max(1);
    let load = |partition: u32| {
        let queue = &topic.partitions[partition as usize];
        let open = queue.open.as_ref().map_or(0, |open| open.builder.bytes());
        let ready: usize = queue.ready.iter().map(|batch| batch.frame.len()).sum();
        (open + ready) / batch_bytes.max(1)
    };
    (1..=count)
        .map(|step| (topic.sticky + step) % count)
        .min_by_key(|partition| load(*partition))
        .unwrap_or(0)
}

/// The batches of one partition in one produce request.
struct PartitionGroup {
    topic: Arc<str>,
    partition: u32,
    batches: Vec<SealedBatch>,
}

/// A produce request being assembled for one shard.
struct Draft {
    target: Target,
    payload_bytes: usize,
    groups: Vec<PartitionGroup>,
}

struct Collected {
    drafts: Vec<Draft>,
    deadline: Option<Instant>,
    idle: bool,
}

async fn run_sender(shared: Arc<Shared>) {
    loop {
        let collected = collect(&shared, Instant::now());
        // After collecting: it may have found a partition without a leader.
        refresh_stale_routes(&shared);
        for draft in collected.drafts {
            tokio::spawn(dispatch(shared.clone(), draft));
        }
        if collected.idle && shared.closing.load(Ordering::Acquire) {
            return;
        }
        match collected.deadline {
            Some(deadline) => {
                tokio::select! {
                    _ = shared.wake.notified() => {}
                    _ = tokio::time::sleep_until(deadline.into()) => {}
                }
            }
            None => shared.wake.notified().await,
        }
    }
}

/// Fetches metadata for topics whose leaders proved stale, in the background;
/// the new route replaces the old and wakes the sender.
fn refresh_stale_routes(shared: &Arc<Shared>) {
    let mut state = shared.lock();
    for (name, topic) in state.topics.iter_mut() {
        if !topic.stale || topic.refreshing {
            continue;
        }
        topic.refreshing = true;
        let (shared, name) = (shared.clone(), name.clone());
        tokio::spawn(async move {
            let route = shared.client.topic_route(&name, true).await;
            tracing::debug!(topic = %name, ?route, "refreshed a stale route");
            {
                let mut state = shared.lock();
                if let Some(topic) = state.topics.get_mut(&name) {
                    topic.refreshing = false;
                    match route {
                        Ok(route) if route.partition_count() as usize == topic.partitions.len() => {
                            topic.stale = route.leaders.contains(&0);
                            topic.route = route;
                        }
                        Ok(_) | Err(_) => {}
                    }
                }
            }
            if shared.lock().topics.get(&name).is_some_and(|t| t.stale) {
                // No leader yet for some partition: ask again shortly.
                tokio::time::sleep(crate::client::LEADER_RETRY_WAIT).await;
            }
            shared.wake.notify_one();
        });
    }
}

/// Seals lingered batches and takes every sendable batch, grouped per leader
/// node and shard.
fn collect(shared: &Shared, now: Instant) -> Collected {
    let config = &shared.config;
    let closing = shared.closing.load(Ordering::Acquire);
    let mut state = shared.lock();
    let mut drafts: HashMap<Target, Draft> = HashMap::new();
    let mut finished = Vec::new();
    let mut deadline: Option<Instant> = None;
    let mut idle = true;
    for topic in state.topics.values_mut() {
        for (partition, queue) in topic.partitions.iter_mut().enumerate() {
            if let Some(open) = &queue.open {
                let due = open.opened + config.linger;
                if closing || due <= now {
                    queue.seal(now);
                } else {
                    deadline = min_instant(deadline, due);
                }
            }
            idle &= queue.is_idle();
            let Some(target) = topic.route.target(partition as u32) else {
                // No leader known: wait for fresh metadata.
                topic.stale |= !queue.ready.is_empty();
                continue;
            };
            if topic.stale && topic.refreshing {
                continue;
            }
            let taken = take_sendable(queue, config, now, &mut deadline);
            if taken.is_empty() {
                continue;
            }
            let draft = drafts.entry(target).or_insert_with(|| Draft {
                target,
                payload_bytes: 0,
                groups: Vec::new(),
            });
            draft.payload_bytes += taken.iter().map(|batch| batch.frame.len()).sum::<usize>();
            draft.groups.push(PartitionGroup {
                topic: topic.route.name.clone(),
                partition: partition as u32,
                batches: taken,
            });
            if draft.payload_bytes >= config.request_bytes_max {
                finished.extend(drafts.remove(&target));
            }
        }
    }
    prune_outstanding(&mut state);
    finished.extend(drafts.into_values());
    Collected {
        drafts: finished,
        deadline,
        idle,
    }
}

fn take_sendable(
    queue: &mut PartitionQueue,
    config: &ProducerConfig,
    now: Instant,
    deadline: &mut Option<Instant>,
) -> Vec<SealedBatch> {
    let mut taken: Vec<SealedBatch> = Vec::new();
    if queue.in_flight >= config.max_in_flight {
        return taken;
    }
    let mut bytes = 0;
    while let Some(front) = queue.ready.front() {
        if let Some(retry_at) = front.retry_at.filter(|at| *at > now) {
            if taken.is_empty() {
                *deadline = min_instant(*deadline, retry_at);
            }
            break;
        }
        if !taken.is_empty() && bytes + front.frame.len() > config.request_bytes_max {
            break;
        }
        if front.idempotent {
            // Every batch that may be retried stays within the broker's
            // duplicate window, and a retried batch (possibly a duplicate, which
            // the broker answers with its original offset) goes out alone.
            let retried = front.attempts > 0;
            if queue.in_flight_batches + taken.len() >= IDEMPOTENT_BATCHES_IN_FLIGHT_MAX
                || (retried && !taken.is_empty())
            {
                break;
            }
            taken.extend(queue.ready.pop_front());
            bytes += taken.last().map_or(0, |batch| batch.frame.len());
            if retried {
                break;
            }
            continue;
        }
        bytes += front.frame.len();
        taken.extend(queue.ready.pop_front());
    }
    if !taken.is_empty() {
        queue.in_flight += 1;
        queue.in_flight_batches += taken.len();
        for batch in &mut taken {
            batch.sent_behind = batch.idempotent && queue.earlier_unsettled(batch.sequence);
        }
    }
    taken
}

fn min_instant(current: Option<Instant>, candidate: Instant) -> Option<Instant> {
    Some(current.map_or(candidate, |current| current.min(candidate)))
}

fn prune_outstanding(state: &mut State) {
    if state.outstanding.len() > 2 * state.outstanding_pruned_len + 1024 {
        state.outstanding.retain(|slot| !slot.is_done());
        state.outstanding_pruned_len = state.outstanding.len();
    }
}

/// Sends one produce request and applies its outcome.
async fn dispatch(shared: Arc<Shared>, draft: Draft) {
    tracing::debug!(
        target_node = draft.target.node,
        shard = draft.target.shard,
        groups = draft.groups.len(),
        "sending a produce request"
    );
    let (body, payload) = build_produce(&shared, &draft);
    let started = Instant::now();
    for group in &draft.groups {
        for batch in &group.batches {
            shared
                .stats
                .queue_time
                .record(started.saturating_duration_since(batch.sealed));
        }
    }
    let client = &shared.client;
    let timeout = client.config().request_timeout + Duration::from_secs(5);
    let outcome = match shared.config.acks {
        Acks::None => match client.connection_to(draft.target).await {
            Ok(connection) => connection.send_oneway(&body, payload).await.map(|()| None),
            Err(error) => Err(error),
        },
        _ => client
            .send_to(draft.target, &body, payload, timeout)
            .await
            .map(Some),
    };
    shared.stats.request_latency.record(started.elapsed());
    if outcome.is_err() {
        shared.stats.requests_failed.fetch_add(1, Ordering::Relaxed);
    }
    complete(&shared, draft.groups, outcome);
}

fn build_produce(shared: &Shared, draft: &Draft) -> (RequestBody, Vec<Bytes>) {
    let mut topics: Vec<ProduceTopicRanges> = Vec::new();
    let mut payload = Vec::new();
    let mut offset = 0usize;
    for group in &draft.groups {
        let bytes: usize = group.batches.iter().map(|batch| batch.frame.len()).sum();
        let range = ProducePartitionRange {
            partition: group.partition,
            payload_offset: offset as u32,
            payload_bytes: bytes as u32,
        };
        offset += bytes;
        payload.extend(group.batches.iter().map(|batch| batch.frame.clone()));
        match topics.iter_mut().find(|topic| *topic.name == *group.topic) {
            Some(topic) => topic.partitions.push(range),
            None => topics.push(ProduceTopicRanges {
                name: group.topic.to_string(),
                partitions: vec![range],
            }),
        }
    }
    let timeout_ms = shared
        .client
        .config()
        .request_timeout
        .as_millis()
        .min(u128::from(u32::MAX)) as u32;
    let body = RequestBody::Produce {
        acks: shared.config.acks.to_wire(),
        timeout_ms,
        topics,
    };
    (body, payload)
}

/// The base offset for one partition group out of a produce outcome.
fn group_outcome(
    group: &PartitionGroup,
    outcome: &Result<Option<ResponseBody>>,
) -> Result<Option<u64>> {
    let body = match outcome {
        Err(error) => return Err(error.clone()),
        Ok(None) => return Ok(None),
        Ok(Some(body)) => body,
    };
    let ResponseBody::Produce(topics) = body else {
        return Err(unexpected("Produce", body));
    };
    let result = topics
        .iter()
        .filter(|(name, _)| **name == *group.topic)
        .flat_map(|(_, partitions)| partitions)
        .find(|result| result.partition == group.partition);
    let result = result.ok_or_else(|| {
        Error::MalformedResponse(format!(
            "no produce result for {}/{}",
            group.topic, group.partition
        ))
    })?;
    partition_error(
        &group.topic,
        group.partition,
        result.error,
        result.message.as_deref(),
    )?;
    Ok(Some(result.base_offset))
}

fn complete(shared: &Shared, groups: Vec<PartitionGroup>, outcome: Result<Option<ResponseBody>>) {
    let now = Instant::now();
    let mut released = 0;
    {
        let mut state = shared.lock();
        for group in groups {
            let result = group_outcome(&group, &outcome);
            let queue = state
                .topics
                .get_mut(&*group.topic)
                .and_then(|topic| topic.partitions.get_mut(group.partition as usize));
            let Some(queue) = queue else {
                continue;
            };
            queue.in_flight = queue.in_flight.saturating_sub(1);
            queue.in_flight_batches = queue.in_flight_batches.saturating_sub(group.batches.len());
            let stale = result.as_ref().err().is_some_and(Error::means_stale_route);
            released += settle(shared, queue, group.batches, result, now);
            if stale {
                if let Some(topic) = state.topics.get_mut(&*group.topic) {
                    topic.stale = true;
                }
            }
        }
    }
    shared.release(released);
    shared.wake.notify_one();
}

/// Resolves or requeues the batches of one group; returns the buffer bytes freed.
fn settle(
    shared: &Shared,
    queue: &mut PartitionQueue,
    batches: Vec<SealedBatch>,
    result: Result<Option<u64>>,
    now: Instant,
) -> usize {
    let mut released = 0;
    match result {
        Ok(base_offset) => {
            let mut next = base_offset;
            for batch in batches {
                batch.slot.complete(Ok(next));
                next = next.map(|offset| offset + u64::from(batch.record_count));
                released += batch.reserved_bytes;
                queue.unsettled.remove(&batch.sequence);
            }
        }
        Err(error) => {
            for mut batch in batches {
                let elapsed = now.saturating_duration_since(batch.sealed);
                if should_retry(queue, &batch, &error) && elapsed < shared.config.delivery_timeout {
                    batch.attempts += 1;
                    batch.retry_at = Some(now + backoff(&shared.config, batch.attempts));
                    tracing::debug!(%error, attempts = batch.attempts, "retrying produce batch");
                    shared.stats.batches_retried.fetch_add(1, Ordering::Relaxed);
                    *shared
                        .stats
                        .last_retry_error
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(error.to_string());
                    queue.requeue(batch);
                    continue;
                }
                queue.unsettled.remove(&batch.sequence);
                let final_error = if error.is_retriable() {
                    Error::DeliveryTimeout {
                        elapsed,
                        last: Box::new(error.clone()),
                    }
                } else {
                    error.clone()
                };
                batch.slot.complete(Err(final_error));
                released += batch.reserved_bytes;
            }
        }
    }
    released
}

/// Whether a failed batch goes back to its queue: a retriable error, or an
/// idempotent batch refused as out of order only because an earlier batch of
/// its partition is still being retried.
fn should_retry(queue: &PartitionQueue, batch: &SealedBatch, error: &Error) -> bool {
    if error.is_retriable() {
        return true;
    }
    batch.idempotent
        && matches!(error, Error::OutOfOrderSequence { .. })
        && (queue.earlier_unsettled(batch.sequence) || batch.sent_behind)
}

fn backoff(config: &ProducerConfig, attempts: u32) -> Duration {
    let exponent = attempts.saturating_sub(1).min(16);
    let base = config
        .retry_backoff
        .saturating_mul(1 << exponent)
        .min(config.retry_backoff_max);
    let jitter = 0.8 + 0.4 * rand::random::<f64>();
    base.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_bounded() {
        let config = ProducerConfig::default();
        let first = backoff(&config, 1);
        assert!(first >= Duration::from_millis(80) && first <= Duration::from_millis(120));
        let late = backoff(&config, 30);
        assert!(late <= Duration::from_millis(1200));
    }

    #[test]
    fn keyless_records_take_turns_and_pass_over_a_partition_that_queues_up() {
        let mut topic = TopicState {
            route: Arc::new(TopicRoute {
                name: Arc::from("t"),
                shards: vec![0; 3],
                leaders: vec![1; 3],
            }),
            partitions: (0..3).map(|_| PartitionQueue::default()).collect(),
            sticky: 0,
            sticky_sent: 0,
            round_robin: 0,
            stale: false,
            refreshing: false,
        };
        let mut visits = Vec::new();
        for _ in 0..6 {
            topic.sticky = next_sticky(&topic, 1000);
            visits.push(topic.sticky);
        }
        assert_eq!(
            visits,
            [1, 2, 0, 1, 2, 0],
            "partitions that keep up take turns"
        );
        // Partition 1 stops draining: two batches wait to be sent.
        let slot = BatchSlot::new(Arc::from("t"), 1);
        for sequence in 0..2 {
            topic.partitions[1].ready.push_back(SealedBatch {
                frame: Bytes::from(vec![0u8; 1000]),
                slot: slot.clone(),
                sequence,
                idempotent: false,
                record_count: 1,
                sealed: Instant::now(),
                attempts: 0,
                retry_at: None,
                reserved_bytes: 0,
                sent_behind: false,
            });
        }
        let mut visits = Vec::new();
        for _ in 0..4 {
            topic.sticky = next_sticky(&topic, 1000);
            visits.push(topic.sticky);
        }
        assert_eq!(
            visits,
            [2, 0, 2, 0],
            "the partition that queues up is passed over"
        );
    }

    #[test]
    fn requeue_keeps_sequence_order() {
        let slot = BatchSlot::new(Arc::from("t"), 0);
        let make = |sequence| SealedBatch {
            frame: Bytes::new(),
            slot: slot.clone(),
            sequence,
            idempotent: false,
            record_count: 1,
            sealed: Instant::now(),
            attempts: 0,
            retry_at: None,
            reserved_bytes: 0,
            sent_behind: false,
        };
        let mut queue = PartitionQueue::default();
        queue.ready.push_back(make(3));
        queue.requeue(make(1));
        queue.requeue(make(2));
        let order: Vec<u64> = queue.ready.iter().map(|batch| batch.sequence).collect();
        assert_eq!(order, vec![1, 2, 3]);
    }

    fn open_batch(records: usize) -> OpenBatch {
        let mut builder = BatchBuilder::with_capacity(256);
        for index in 0..records {
            builder.append(index as i64, None, Some(b"v"), &[]).unwrap();
        }
        OpenBatch {
            builder,
            slot: BatchSlot::new(Arc::from("t"), 0),
            opened: Instant::now(),
            reserved_bytes: 0,
        }
    }

    fn idempotent_queue() -> PartitionQueue {
        PartitionQueue {
            identity: Some(ProducerIdentity {
                producer_id: 42,
                producer_epoch: 1,
            }),
            ..PartitionQueue::default()
        }
    }

    #[test]
    fn sealed_batches_get_contiguous_sequences() {
        let mut queue = idempotent_queue();
        for records in [3, 2, 4] {
            queue.open = Some(open_batch(records));
            queue.seal(Instant::now());
        }
        let stamps: Vec<(i64, i16, i32, u32)> = queue
            .ready
            .iter()
            .map(|sealed| {
                let header = crate::batch::Batch::verify(sealed.frame.clone())
                    .unwrap()
                    .header;
                (
                    header.producer_id,
                    header.producer_epoch,
                    header.base_sequence,
                    header.record_count,
                )
            })
            .collect();
        assert_eq!(stamps, vec![(42, 1, 0, 3), (42, 1, 3, 2), (42, 1, 5, 4)]);
        assert_eq!(queue.next_base_sequence, 9);
        assert!(queue.ready.iter().all(|sealed| sealed.idempotent));
        assert_eq!(queue.unsettled.len(), 3);

        let mut plain = PartitionQueue {
            open: Some(open_batch(2)),
            ..PartitionQueue::default()
        };
        plain.seal(Instant::now());
        let header = crate::batch::Batch::verify(plain.ready[0].frame.clone())
            .unwrap()
            .header;
        assert_eq!((header.producer_id, header.base_sequence), (-1, -1));
        assert!(!plain.ready[0].idempotent && plain.unsettled.is_empty());
    }

    #[test]
    fn idempotent_batches_in_flight_are_capped_and_retries_go_alone() {
        let config = ProducerConfig::default();
        let now = Instant::now();
        let mut deadline = None;
        let mut queue = idempotent_queue();
        for _ in 0..IDEMPOTENT_BATCHES_IN_FLIGHT_MAX + 3 {
            queue.open = Some(open_batch(1));
            queue.seal(now);
        }
        let first = take_sendable(&mut queue, &config, now, &mut deadline);
        assert_eq!(first.len(), IDEMPOTENT_BATCHES_IN_FLIGHT_MAX);
        assert!(take_sendable(&mut queue, &config, now, &mut deadline).is_empty());
        // The first request fails: its batches come back for a retry.
        queue.in_flight -= 1;
        queue.in_flight_batches -= first.len();
        for mut batch in first {
            batch.attempts = 1;
            queue.requeue(batch);
        }
        let retry = take_sendable(&mut queue, &config, now, &mut deadline);
        assert_eq!(retry.len(), 1, "a retried batch goes alone");
        assert_eq!(retry[0].sequence, 0);
        let next = take_sendable(&mut queue, &config, now, &mut deadline);
        assert_eq!(next.iter().map(|b| b.sequence).collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn out_of_order_is_retried_only_behind_an_earlier_batch() {
        let mut queue = idempotent_queue();
        for _ in 0..2 {
            queue.open = Some(open_batch(1));
            queue.seal(Instant::now());
        }
        let gap = Error::OutOfOrderSequence { message: None };
        let second = queue.ready.pop_back().unwrap();
        assert!(
            should_retry(&queue, &second, &gap),
            "batch 0 is still unsettled"
        );
        let first = queue.ready.pop_front().unwrap();
        assert!(!should_retry(&queue, &first, &gap), "a real gap");
        queue.unsettled.remove(&first.sequence);
        assert!(
            !should_retry(&queue, &second, &gap),
            "nothing earlier any more"
        );
        let timeout = Error::from_code(crate::error::Code::RequestTimedOut, None);
        assert!(should_retry(&queue, &first, &timeout));
        let invalid = Error::from_code(crate::error::Code::InvalidBatch, None);
        assert!(!should_retry(&queue, &second, &invalid));
    }

    #[test]
    fn slot_completes_once() {
        let slot = BatchSlot::new(Arc::from("t"), 2);
        slot.complete(Ok(Some(10)));
        slot.complete(Err(Error::ProducerClosed));
        assert!(slot.is_done());
        let waker = futures_noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut delivery = DeliveryFuture {
            slot,
            index: 3,
            timestamp_ms: 5,
        };
        let Poll::Ready(Ok(metadata)) = Pin::new(&mut delivery).poll(&mut cx) else {
            panic!("not ready");
        };
        assert_eq!(metadata.offset, Some(13));
        assert_eq!(metadata.partition, 2);
    }

    struct NoopWake;

    impl std::task::Wake for NoopWake {
        fn wake(self: Arc<Self>) {}
    }

    fn futures_noop_waker() -> Waker {
        Waker::from(Arc::new(NoopWake))
    }
}
