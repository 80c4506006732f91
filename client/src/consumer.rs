//! [`Consumer`]: reads assigned partitions (no consumer groups yet).
//!
//! The consumer keeps up to `fetches_in_flight` fetches in flight per broker
//! shard, each covering the assigned partitions that shard owns that want one,
//! sent on that shard's connection. Fetches long-poll (`max_wait`), and the next
//! fetch starts as soon as one returns, while fewer than `buffered_bytes_max`
//! bytes wait to be consumed (prefetch). Fetched batches are kept as zero-copy
//! slices of the response frame; records are decoded only when consumed.
//!
//! A partition that is behind its high watermark by more than a fetch is read
//! as a pipeline: the range ahead is cut into pieces of about a fetch's worth
//! of records (from the bytes per record seen so far), fetched at once, each
//! asking for the batches that start inside its piece (`end_offset`,
//! `whole_batches`), so the pieces join without overlap. Results are applied in
//! piece order whatever order they arrive in. A piece that comes back short
//! (its byte budget cut it) leaves a gap before the next one: the pieces after
//! it are dropped and reading goes on from where the data ends, so a wrong
//! guess costs a fetch, never a record.
//!
//! Positions are resolved lazily: a seek to `Beginning`, `End` or a timestamp
//! becomes a ListOffsets lookup right before the partition's next fetch. A seek
//! bumps the partition's epoch, so batches already fetched or in flight for the
//! old position are discarded; [`Consumer::unassign`] does the same and stops
//! fetching the partition (its slot is kept, so outcomes still in flight for
//! it are recognized and dropped).

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use tokio::sync::mpsc;

use crate::batch::{Batch, BatchIter, Header, RecordIter};
use crate::client::{partition_error, unexpected, Client, Target, TopicRoute};
use crate::error::{Code, Error, Result};
use crate::request::{FetchPartitionSpec, OffsetQuery, RequestBody};
use crate::response::{FetchPartitionResult, ResponseBody};

/// The most a broker reads of one partition for one fetch.
const READ_BYTES_MAX: usize = 16 << 20;
/// A broker's response budget when a fetch gives none (`max_bytes` = 0).
const FETCH_BYTES_DEFAULT: usize = 32 << 20;

/// Where to move a partition's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeekTo {
    /// The log start offset.
    Beginning,
    /// The high watermark: only records produced from now on.
    End,
    /// An absolute offset.
    Offset(u64),
    /// The first record whose batch has a timestamp >= this (ms since the epoch).
    Timestamp(i64),
}

/// Consumer settings.
#[derive(Debug, Clone)]
#[must_use]
pub struct ConsumerConfig {
    /// Long-poll wait of a fetch.
    pub max_wait: Duration,
    /// Bytes a fetch waits for.
    pub min_bytes: u32,
    /// Byte budget of one fetch response.
    pub max_bytes: u32,
    /// Byte budget per partition in a fetch.
    pub partition_max_bytes: u32,
    /// Where a newly assigned partition starts.
    pub start: SeekTo,
    /// No new fetch starts while this many fetched bytes wait to be consumed.
    pub buffered_bytes_max: usize,
    /// Fetches in flight per broker shard, and pieces in flight per partition
    /// read as a pipeline (1: one fetch at a time, no pipeline).
    pub fetches_in_flight: usize,
    /// Pause after a retriable fetch failure.
    pub retry_backoff: Duration,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            max_wait: Duration::from_millis(500),
            min_bytes: 1,
            max_bytes: 32 * 1024 * 1024,
            partition_max_bytes: 4 * 1024 * 1024,
            start: SeekTo::Beginning,
            buffered_bytes_max: 64 * 1024 * 1024,
            fetches_in_flight: 4,
            retry_backoff: Duration::from_millis(100),
        }
    }
}

/// A consumed record. Key, value and header values are slices of the fetched
/// response (no copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    /// Topic.
    pub topic: Arc<str>,
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// Timestamp (ms since the epoch).
    pub timestamp_ms: i64,
    /// Key.
    pub key: Option<Bytes>,
    /// Value.
    pub value: Option<Bytes>,
    /// Headers.
    pub headers: Vec<Header>,
}

/// A whole fetched batch (verified), for callers that process batches directly.
#[derive(Debug, Clone)]
pub struct FetchedBatch {
    /// Topic.
    pub topic: Arc<str>,
    /// Partition.
    pub partition: u32,
    /// The batch; its frame is a slice of the fetch response.
    pub batch: Batch,
    /// Records below this offset were already consumed or precede the requested
    /// position; [`FetchedBatch::records`] skips them.
    pub first_offset: u64,
    index: usize,
    epoch: u64,
}

impl FetchedBatch {
    /// Records at or after [`FetchedBatch::first_offset`].
    pub fn records(&self) -> impl Iterator<Item = Result<crate::batch::Record>> + '_ {
        let first = self.first_offset;
        self.batch.records().filter(move |record| {
            record
                .as_ref()
                .map_or(true, |record| record.offset >= first)
        })
    }

    /// Records in the batch at or after `first_offset` (from the header, without
    /// decoding).
    pub fn record_count(&self) -> u64 {
        let header = &self.batch.header;
        header
            .next_offset()
            .saturating_sub(self.first_offset.max(header.base_offset))
    }
}

#[derive(Debug, Clone, Copy)]
enum Position {
    Resolved(u64),
    Pending(SeekTo),
}

struct PartState {
    topic: Arc<str>,
    partition: u32,
    /// `false` after [`Consumer::unassign`] (until assigned again).
    assigned: bool,
    /// The partition's leader as last known; `None` after it proved stale (a
    /// fresh route is fetched before the next fetch).
    target: Option<Target>,
    fetch: Position,
    consumed: Option<u64>,
    epoch: u64,
    /// Fetches in flight for the partition, in offset order (pieces of a
    /// pipeline; only the last may be unbounded).
    window: VecDeque<Slot>,
    /// Moves on when the window is dropped: outcomes of older pieces are ignored.
    window_gen: u64,
    next_seq: u64,
    /// A route lookup is in flight.
    routing: bool,
    paused: bool,
    high_watermark: Option<u64>,
    log_start_offset: Option<u64>,
    /// Averages of what fetches returned (0: nothing yet): they size the pieces.
    bytes_per_record: f64,
    bytes_per_batch: f64,
}

/// One fetch of a partition in flight.
struct Slot {
    seq: u64,
    /// First offset of the piece (`None` for a first fetch from a pending seek).
    start: Option<u64>,
    /// End of the piece; `None`: up to the high watermark (the window's last).
    end: Option<u64>,
    /// The outcome, once it came, kept until the pieces before it are applied.
    result: Option<Result<(u64, FetchPartitionResult)>>,
}

struct FetchItem {
    index: usize,
    epoch: u64,
    window_gen: u64,
    seq: u64,
    topic: Arc<str>,
    partition: u32,
    position: Position,
    end: Option<u64>,
    whole_batches: bool,
}

struct ItemOutcome {
    index: usize,
    epoch: u64,
    window_gen: u64,
    seq: u64,
    result: Result<(u64, FetchPartitionResult)>,
}

enum Outcome {
    /// A fetch to `target` finished.
    Fetched {
        target: Target,
        items: Vec<ItemOutcome>,
    },
    /// Fresh leaders for partitions whose route was stale: (index, epoch, leader).
    Routed(Vec<(usize, u64, Option<Target>)>),
}

struct Current {
    batch: FetchedBatch,
    records: RecordIter,
}

/// Reads assigned partitions; a [`Stream`] of [`ConsumerRecord`]s.
pub struct Consumer {
    client: Client,
    config: ConsumerConfig,
    parts: Vec<PartState>,
    index: HashMap<(Arc<str>, u32), usize>,
    /// Fetches in flight per leader shard.
    target_fetches: HashMap<Target, usize>,
    outcomes_tx: mpsc::UnboundedSender<Outcome>,
    outcomes: mpsc::UnboundedReceiver<Outcome>,
    buffer: VecDeque<FetchedBatch>,
    buffered_bytes: usize,
    current: Option<Current>,
    errors: VecDeque<Error>,
    stats: ConsumerStats,
}

/// What a consumer's fetching did (counters since it was created).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumerStats {
    /// Fetch requests sent.
    pub fetches: u64,
    /// Partition fetches that were a bounded piece of a pipeline.
    pub pieces: u64,
    /// Pieces dropped unused (the one before came back short, or failed).
    pub pieces_dropped: u64,
    /// Most fetches in flight to one broker shard at once.
    pub in_flight_max: usize,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("assigned", &self.parts.len())
            .finish()
    }
}

impl Consumer {
    /// A consumer with nothing assigned.
    pub fn new(client: Client, config: ConsumerConfig) -> Consumer {
        let (outcomes_tx, outcomes) = mpsc::unbounded_channel();
        Consumer {
            client,
            config,
            parts: Vec::new(),
            index: HashMap::new(),
            target_fetches: HashMap::new(),
            outcomes_tx,
            outcomes,
            buffer: VecDeque::new(),
            buffered_bytes: 0,
            current: None,
            errors: VecDeque::new(),
            stats: ConsumerStats::default(),
        }
    }

    /// Adds partitions of `topic` (all of them if `partitions` is empty), starting
    /// at [`ConsumerConfig::start`]. Already assigned partitions are unchanged.
    pub async fn assign(&mut self, topic: &str, partitions: &[u32]) -> Result<()> {
        let route = self.client.topic_route(topic, true).await?;
        let all: Vec<u32> = (0..route.partition_count()).collect();
        let wanted = if partitions.is_empty() {
            &all[..]
        } else {
            partitions
        };
        self.assign_route(&route, wanted, self.config.start)
    }

    /// Adds `partitions` of the topic `route` describes, starting at `start`;
    /// already assigned partitions are unchanged.
    pub(crate) fn assign_route(
        &mut self,
        route: &TopicRoute,
        partitions: &[u32],
        start: SeekTo,
    ) -> Result<()> {
        if let Some(&partition) = partitions
            .iter()
            .find(|partition| **partition >= route.partition_count())
        {
            return Err(Error::UnknownPartition {
                topic: route.name.to_string(),
                partition,
            });
        }
        for &partition in partitions {
            let target = route.target(partition);
            let key = (route.name.clone(), partition);
            let fetch = match start {
                SeekTo::Offset(offset) => Position::Resolved(offset),
                other => Position::Pending(other),
            };
            let consumed = match start {
                SeekTo::Offset(offset) => Some(offset),
                _ => None,
            };
            if let Some(&index) = self.index.get(&key) {
                let part = &mut self.parts[index];
                if part.assigned {
                    continue;
                }
                // Assigned again after an unassign: a fresh start (the epoch
                // moved on at the unassign, so nothing old is delivered).
                part.assigned = true;
                part.epoch += 1;
                part.target = target;
                part.fetch = fetch;
                part.consumed = consumed;
                part.paused = false;
                part.high_watermark = None;
                part.log_start_offset = None;
                part.window.clear();
                continue;
            }
            self.index.insert(key, self.parts.len());
            self.parts.push(PartState {
                topic: route.name.clone(),
                partition,
                assigned: true,
                target,
                fetch,
                consumed,
                epoch: 0,
                window: VecDeque::new(),
                window_gen: 0,
                next_seq: 0,
                routing: false,
                paused: false,
                high_watermark: None,
                log_start_offset: None,
                bytes_per_record: 0.0,
                bytes_per_batch: 0.0,
            });
        }
        Ok(())
    }

    /// Stops reading a partition: it is no longer fetched, and its buffered
    /// batches (and those of fetches still in flight) are dropped, so none of
    /// its records is returned after this call.
    pub fn unassign(&mut self, topic: &str, partition: u32) -> Result<()> {
        let index = self.part_index(topic, partition)?;
        let part = &mut self.parts[index];
        part.assigned = false;
        part.epoch += 1;
        part.paused = false;
        part.consumed = None;
        part.high_watermark = None;
        part.log_start_offset = None;
        part.window.clear();
        self.drop_buffered(index);
        Ok(())
    }

    /// Drops the buffered batches (and the batch being decoded) of one partition.
    fn drop_buffered(&mut self, index: usize) {
        let mut freed = 0;
        self.buffer.retain(|batch| {
            let keep = batch.index != index;
            if !keep {
                freed += batch.batch.frame.len();
            }
            keep
        });
        self.buffered_bytes -= freed;
        if self
            .current
            .as_ref()
            .is_some_and(|current| current.batch.index == index)
        {
            self.current = None;
        }
    }

    /// Assigned `(topic, partition)` pairs.
    pub fn assignment(&self) -> Vec<(Arc<str>, u32)> {
        self.parts
            .iter()
            .filter(|part| part.assigned)
            .map(|part| (part.topic.clone(), part.partition))
            .collect()
    }

    fn part_index(&self, topic: &str, partition: u32) -> Result<usize> {
        self.index
            .get(&(Arc::from(topic), partition))
            .copied()
            .filter(|index| self.parts[*index].assigned)
            .ok_or_else(|| Error::NotAssigned {
                topic: topic.to_owned(),
                partition,
            })
    }

    /// Moves a partition's position; buffered records of the old position are
    /// dropped. Also clears a partition paused by an error.
    pub fn seek(&mut self, topic: &str, partition: u32, to: SeekTo) -> Result<()> {
        let index = self.part_index(topic, partition)?;
        let part = &mut self.parts[index];
        part.epoch += 1;
        part.paused = false;
        part.fetch = match to {
            SeekTo::Offset(offset) => Position::Resolved(offset),
            other => Position::Pending(other),
        };
        part.consumed = match to {
            SeekTo::Offset(offset) => Some(offset),
            _ => None,
        };
        part.window.clear();
        self.drop_buffered(index);
        Ok(())
    }

    /// Offset of the next record this consumer will return for the partition;
    /// `None` until a pending seek (beginning/end/timestamp) is resolved.
    pub fn position(&self, topic: &str, partition: u32) -> Result<Option<u64>> {
        Ok(self.parts[self.part_index(topic, partition)?].consumed)
    }

    /// The high watermark seen in the latest fetch of the partition.
    pub fn high_watermark(&self, topic: &str, partition: u32) -> Result<Option<u64>> {
        Ok(self.parts[self.part_index(topic, partition)?].high_watermark)
    }

    /// Counters of the fetches made so far.
    pub fn stats(&self) -> ConsumerStats {
        self.stats
    }

    /// The log start offset seen in the latest fetch of the partition.
    pub fn log_start_offset(&self, topic: &str, partition: u32) -> Result<Option<u64>> {
        Ok(self.parts[self.part_index(topic, partition)?].log_start_offset)
    }

    /// The next record (or error). Same as polling the [`Stream`].
    pub async fn recv(&mut self) -> Option<Result<ConsumerRecord>> {
        poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }

    /// Every fetched batch buffered now, waiting for a fetch if none is. The
    /// partitions' positions move past the returned batches.
    pub async fn next_batches(&mut self) -> Result<Vec<FetchedBatch>> {
        poll_fn(|cx| self.poll_batches(cx)).await
    }

    fn poll_batches(&mut self, cx: &mut Context<'_>) -> Poll<Result<Vec<FetchedBatch>>> {
        loop {
            if let Some(error) = self.errors.pop_front() {
                return Poll::Ready(Err(error));
            }
            let batches = self.drain_batches();
            if !batches.is_empty() {
                return Poll::Ready(Ok(batches));
            }
            match self.poll_outcome(cx) {
                Poll::Ready(true) => continue,
                Poll::Ready(false) => return Poll::Ready(Ok(Vec::new())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn drain_batches(&mut self) -> Vec<FetchedBatch> {
        let mut batches = Vec::new();
        if let Some(current) = self.current.take() {
            let mut batch = current.batch;
            if let Some(consumed) = self.parts[batch.index].consumed {
                batch.first_offset = batch.first_offset.max(consumed);
            }
            self.parts[batch.index].consumed = Some(batch.batch.header.next_offset());
            batches.push(batch);
        }
        while let Some(batch) = self.buffer.pop_front() {
            self.buffered_bytes -= batch.batch.frame.len();
            let part = &mut self.parts[batch.index];
            if batch.epoch == part.epoch {
                part.consumed = Some(batch.batch.header.next_offset());
                batches.push(batch);
            }
        }
        batches
    }

    /// Starts fetches, then waits for one outcome. `Ready(false)` never happens
    /// in practice (the consumer holds a sender of the channel).
    fn poll_outcome(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        self.start_fetches();
        match self.outcomes.poll_recv(cx) {
            Poll::Ready(Some(outcome)) => {
                self.apply(outcome);
                Poll::Ready(true)
            }
            Poll::Ready(None) => Poll::Ready(false),
            Poll::Pending => Poll::Pending,
        }
    }

    fn next_record(&mut self) -> Option<Result<ConsumerRecord>> {
        loop {
            if let Some(current) = &mut self.current {
                let part = &mut self.parts[current.batch.index];
                if current.batch.epoch != part.epoch {
                    self.current = None;
                    continue;
                }
                match current.records.next() {
                    Some(Ok(record)) if record.offset < current.batch.first_offset => continue,
                    Some(Ok(record)) => {
                        part.consumed = Some(record.offset + 1);
                        return Some(Ok(to_consumer_record(&current.batch, record)));
                    }
                    Some(Err(error)) => {
                        part.paused = true;
                        self.current = None;
                        return Some(Err(error));
                    }
                    None => {
                        let next = current.batch.batch.header.next_offset();
                        part.consumed =
                            Some(part.consumed.map_or(next, |consumed| consumed.max(next)));
                        self.current = None;
                    }
                }
            }
            let batch = self.buffer.pop_front()?;
            self.buffered_bytes -= batch.batch.frame.len();
            if batch.epoch != self.parts[batch.index].epoch {
                continue;
            }
            if batch.batch.header.is_control() {
                self.parts[batch.index].consumed = Some(batch.batch.header.next_offset());
                continue;
            }
            let records = batch.batch.records();
            self.current = Some(Current { batch, records });
        }
    }

    fn start_fetches(&mut self) {
        if self.buffered_bytes >= self.config.buffered_bytes_max {
            return;
        }
        let depth = self.config.fetches_in_flight.max(1);
        let partition_max_bytes =
            (self.config.partition_max_bytes as usize).clamp(1, READ_BYTES_MAX);
        // Reading ahead (a partition's pieces after its first fetch) stops where
        // the buffer limit would be passed by what is in flight; a partition's
        // first fetch is never held back by others reading ahead.
        let in_flight: usize = self.parts.iter().map(|part| part.window.len()).sum();
        let room = self.config.buffered_bytes_max - self.buffered_bytes;
        let mut ahead = (room / partition_max_bytes).saturating_sub(in_flight);
        // A response's budget is shared by the partitions it names: a piece is
        // sized to its share, so that it does not come back short.
        let response_bytes = match self.config.max_bytes {
            0 => FETCH_BYTES_DEFAULT,
            n => n as usize,
        };
        let mut sharing: HashMap<Target, usize> = HashMap::new();
        for part in &self.parts {
            if let (Some(target), true, false) = (part.target, part.assigned, part.paused) {
                *sharing.entry(target).or_default() += 1;
            }
        }
        // Per target, requests by rank: a partition's n-th new piece goes in the
        // target's n-th new request.
        let mut by_target: HashMap<Target, Vec<Vec<FetchItem>>> = HashMap::new();
        let mut unrouted: Vec<(usize, u64, Arc<str>, u32)> = Vec::new();
        for (index, part) in self.parts.iter_mut().enumerate() {
            if part.routing || part.paused || !part.assigned {
                continue;
            }
            let Some(target) = part.target else {
                if part.window.is_empty() {
                    part.routing = true;
                    unrouted.push((index, part.epoch, part.topic.clone(), part.partition));
                }
                continue;
            };
            let busy = self.target_fetches.get(&target).copied().unwrap_or(0);
            let requests = by_target.entry(target).or_default();
            let share = response_bytes / sharing.get(&target).copied().unwrap_or(1);
            let piece_budget = partition_max_bytes.min(share.max(1));
            let mut rank = 0;
            while busy + rank < depth {
                let reading_ahead = !part.window.is_empty();
                if reading_ahead && ahead == 0 {
                    break;
                }
                let Some(item) = next_piece(part, index, depth, piece_budget) else {
                    break;
                };
                if reading_ahead {
                    ahead -= 1;
                }
                if requests.len() <= rank {
                    requests.push(Vec::new());
                }
                requests[rank].push(item);
                rank += 1;
            }
        }
        if !unrouted.is_empty() {
            tokio::spawn(route_task(
                self.client.clone(),
                self.config.clone(),
                unrouted,
                self.outcomes_tx.clone(),
            ));
        }
        for (target, requests) in by_target {
            for items in requests {
                let count = self.target_fetches.entry(target).or_default();
                *count += 1;
                self.stats.fetches += 1;
                self.stats.in_flight_max = self.stats.in_flight_max.max(*count);
                self.stats.pieces += items.iter().filter(|item| item.end.is_some()).count() as u64;
                let task = fetch_task(
                    self.client.clone(),
                    self.config.clone(),
                    target,
                    items,
                    self.outcomes_tx.clone(),
                );
                tokio::spawn(task);
            }
        }
    }

    fn apply(&mut self, outcome: Outcome) {
        let items = match outcome {
            Outcome::Routed(routes) => {
                for (index, epoch, target) in routes {
                    let part = &mut self.parts[index];
                    part.routing = false;
                    if epoch == part.epoch || part.target.is_none() {
                        part.target = target;
                    }
                }
                return;
            }
            Outcome::Fetched { target, items } => {
                if let Some(count) = self.target_fetches.get_mut(&target) {
                    *count = count.saturating_sub(1);
                    if *count == 0 {
                        self.target_fetches.remove(&target);
                    }
                }
                items
            }
        };
        for item in items {
            let part = &mut self.parts[item.index];
            if item.epoch != part.epoch || item.window_gen != part.window_gen {
                continue;
            }
            let Some(slot) = part.window.iter_mut().find(|slot| slot.seq == item.seq) else {
                continue;
            };
            slot.result = Some(item.result);
            self.apply_window(item.index);
        }
    }

    /// Applies the outcomes at the head of a partition's window, in piece order.
    fn apply_window(&mut self, index: usize) {
        loop {
            let part = &mut self.parts[index];
            if let (
                Some(Slot {
                    start: Some(start), ..
                }),
                Position::Resolved(position),
            ) = (part.window.front(), part.fetch)
            {
                if *start > position {
                    // The piece before this one came back short: a gap. Drop
                    // this piece and those after it now (not when they answer:
                    // the window's last fetch may be long-polling).
                    self.stats.pieces_dropped += part.window.len() as u64;
                    part.window.clear();
                    part.window_gen += 1;
                    return;
                }
            }
            if part.window.front().is_none_or(|slot| slot.result.is_none()) {
                return;
            }
            let Some(Slot {
                result: Some(result),
                ..
            }) = part.window.pop_front()
            else {
                return;
            };
            if !self.apply_slot(index, result) {
                // Drop the pieces after it; reading goes on from the position.
                let part = &mut self.parts[index];
                self.stats.pieces_dropped += part.window.len() as u64;
                part.window.clear();
                part.window_gen += 1;
                return;
            }
        }
    }

    /// Applies one fetch outcome; false if the pieces after it cannot be used
    /// (a stale route or an error).
    fn apply_slot(&mut self, index: usize, result: Result<(u64, FetchPartitionResult)>) -> bool {
        let part = &mut self.parts[index];
        let stale = match &result {
            Err(error) => error.means_stale_route(),
            Ok((_, result)) => result.error.means_stale_route(),
        };
        if stale {
            tracing::debug!(topic = %part.topic, partition = part.partition, "leader moved or unreachable; refreshing its route");
            part.target = None;
            return false;
        }
        match result {
            Ok((offset, result)) => self.apply_partition(index, offset, result),
            Err(error) if error.is_retriable() => {
                tracing::debug!(%error, topic = %part.topic, partition = part.partition, "fetch failed; retrying");
                false
            }
            Err(error) => {
                part.paused = true;
                self.errors.push_back(error);
                false
            }
        }
    }

    /// Buffers the batches of one fetch outcome; false on an error or a gap.
    fn apply_partition(&mut self, index: usize, offset: u64, result: FetchPartitionResult) -> bool {
        let part = &mut self.parts[index];
        part.high_watermark = Some(result.high_watermark);
        part.log_start_offset = Some(result.log_start_offset);
        if let Position::Pending(_) = part.fetch {
            part.fetch = Position::Resolved(offset);
        }
        part.consumed.get_or_insert(offset);
        if let Err(error) = fetch_error(part, offset, &result) {
            if !error.is_retriable() {
                part.paused = true;
                self.errors.push_back(error);
            }
            return false;
        }
        let (mut bytes, mut records, mut batches) = (0usize, 0u64, 0u32);
        for batch in BatchIter::new(result.records) {
            let batch = match batch {
                Ok(batch) => batch,
                Err(error) => {
                    part.paused = true;
                    self.errors.push_back(error);
                    return false;
                }
            };
            let Position::Resolved(position) = part.fetch else {
                return false;
            };
            if batch.header.next_offset() <= position.max(offset) {
                continue;
            }
            part.fetch = Position::Resolved(batch.header.next_offset());
            bytes += batch.frame.len();
            records += u64::from(batch.header.record_count);
            batches += 1;
            self.buffered_bytes += batch.frame.len();
            self.buffer.push_back(FetchedBatch {
                topic: part.topic.clone(),
                partition: part.partition,
                batch,
                first_offset: offset,
                index,
                epoch: part.epoch,
            });
        }
        if records > 0 {
            let per_record = bytes as f64 / records as f64;
            let per_batch = bytes as f64 / f64::from(batches);
            if part.bytes_per_record == 0.0 {
                part.bytes_per_record = per_record;
                part.bytes_per_batch = per_batch;
            } else {
                part.bytes_per_record = 0.75 * part.bytes_per_record + 0.25 * per_record;
                part.bytes_per_batch = 0.75 * part.bytes_per_batch + 0.25 * per_batch;
            }
        }
        true
    }
}

/// The partition's next fetch, if it may start one: the first fetch from its
/// position, or the next piece of its pipeline (bounded while the piece ends
/// below the high watermark seen, else the window's unbounded last fetch).
fn next_piece(
    part: &mut PartState,
    index: usize,
    depth: usize,
    budget_bytes: usize,
) -> Option<FetchItem> {
    if part.window.len() >= depth || part.window.back().is_some_and(|slot| slot.end.is_none()) {
        return None;
    }
    let (start, whole_batches) = match part.window.back() {
        Some(last) => (Position::Resolved(last.end?), true),
        None => (part.fetch, false),
    };
    let end = match (start, part.high_watermark) {
        (Position::Resolved(start), Some(high_watermark))
            if depth > 1 && part.bytes_per_record > 0.0 =>
        {
            // Room for a batch past the piece's end (the last batch may start
            // inside and end beyond) and for batch sizes to vary.
            let budget = budget_bytes as f64;
            let piece_bytes = (budget - 2.0 * part.bytes_per_batch).max(budget / 4.0);
            let records = (piece_bytes / part.bytes_per_record).max(1.0) as u64;
            let end = start.saturating_add(records);
            (end < high_watermark).then_some(end)
        }
        _ => None,
    };
    let seq = part.next_seq;
    part.next_seq += 1;
    let start_offset = match start {
        Position::Resolved(offset) => Some(offset),
        Position::Pending(_) => None,
    };
    part.window.push_back(Slot {
        seq,
        start: start_offset.filter(|_| whole_batches),
        end,
        result: None,
    });
    Some(FetchItem {
        index,
        epoch: part.epoch,
        window_gen: part.window_gen,
        seq,
        topic: part.topic.clone(),
        partition: part.partition,
        position: start,
        end,
        whole_batches,
    })
}

fn fetch_error(part: &PartState, offset: u64, result: &FetchPartitionResult) -> Result<()> {
    if result.error == Code::OffsetOutOfRange {
        return Err(Error::OffsetOutOfRange {
            topic: part.topic.to_string(),
            partition: part.partition,
            offset,
            log_start_offset: result.log_start_offset,
            high_watermark: result.high_watermark,
        });
    }
    partition_error(
        &part.topic,
        part.partition,
        result.error,
        result.message.as_deref(),
    )
}

fn to_consumer_record(batch: &FetchedBatch, record: crate::batch::Record) -> ConsumerRecord {
    ConsumerRecord {
        topic: batch.topic.clone(),
        partition: batch.partition,
        offset: record.offset,
        timestamp_ms: record.timestamp_ms,
        key: record.key,
        value: record.value,
        headers: record.headers,
    }
}

impl Stream for Consumer {
    type Item = Result<ConsumerRecord>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(error) = this.errors.pop_front() {
                return Poll::Ready(Some(Err(error)));
            }
            if let Some(record) = this.next_record() {
                return Poll::Ready(Some(record));
            }
            match this.poll_outcome(cx) {
                Poll::Ready(true) => continue,
                Poll::Ready(false) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

async fn resolve(client: &Client, topic: &str, partition: u32, position: Position) -> Result<u64> {
    let query = match position {
        Position::Resolved(offset) => return Ok(offset),
        Position::Pending(SeekTo::Offset(offset)) => return Ok(offset),
        Position::Pending(SeekTo::Beginning) => OffsetQuery::Earliest,
        Position::Pending(SeekTo::End) => OffsetQuery::Latest,
        Position::Pending(SeekTo::Timestamp(ms)) => OffsetQuery::Timestamp(ms),
    };
    Ok(client.list_offsets(topic, partition, query).await?.offset)
}

/// Looks up the leaders of partitions whose route was stale (after a short wait,
/// so an election can finish).
async fn route_task(
    client: Client,
    config: ConsumerConfig,
    parts: Vec<(usize, u64, Arc<str>, u32)>,
    outcomes: mpsc::UnboundedSender<Outcome>,
) {
    tokio::time::sleep(config.retry_backoff.min(crate::client::LEADER_RETRY_WAIT)).await;
    let mut routes: HashMap<Arc<str>, Option<Arc<crate::client::TopicRoute>>> = HashMap::new();
    let mut found = Vec::with_capacity(parts.len());
    for (index, epoch, topic, partition) in parts {
        if !routes.contains_key(&topic) {
            let route = client.topic_route(&topic, true).await.ok();
            routes.insert(topic.clone(), route);
        }
        let target = routes
            .get(&topic)
            .and_then(|route| route.as_ref())
            .and_then(|route| route.target(partition));
        found.push((index, epoch, target));
    }
    let _ = outcomes.send(Outcome::Routed(found));
}

/// Resolves pending positions, fetches, and reports the outcome of each item.
async fn fetch_task(
    client: Client,
    config: ConsumerConfig,
    target: Target,
    items: Vec<FetchItem>,
    outcomes: mpsc::UnboundedSender<Outcome>,
) {
    let mut offsets = Vec::with_capacity(items.len());
    for item in &items {
        offsets.push(resolve(&client, &item.topic, item.partition, item.position).await);
    }
    let mut results = fetch(&client, &config, target, &items, &offsets).await;
    let mut outcome_items = Vec::with_capacity(items.len());
    let mut retriable = false;
    for (item, offset) in items.iter().zip(offsets) {
        let result = offset.and_then(|offset| take_result(&mut results, item, offset));
        retriable |= matches!(&result, Err(error) if error.is_retriable());
        retriable |= matches!(&result, Ok((_, found)) if found.error.is_retriable());
        outcome_items.push(ItemOutcome {
            index: item.index,
            epoch: item.epoch,
            window_gen: item.window_gen,
            seq: item.seq,
            result,
        });
    }
    if retriable {
        tokio::time::sleep(config.retry_backoff).await;
    }
    let _ = outcomes.send(Outcome::Fetched {
        target,
        items: outcome_items,
    });
}

type FetchResults = Result<Vec<(String, Vec<FetchPartitionResult>)>>;

async fn fetch(
    client: &Client,
    config: &ConsumerConfig,
    target: Target,
    items: &[FetchItem],
    offsets: &[Result<u64>],
) -> FetchResults {
    let mut topics: Vec<(String, Vec<FetchPartitionSpec>)> = Vec::new();
    for (item, offset) in items.iter().zip(offsets) {
        let Ok(offset) = offset else {
            continue;
        };
        let spec = FetchPartitionSpec {
            partition: item.partition,
            offset: *offset,
            max_bytes: config.partition_max_bytes,
            end_offset: item.end.unwrap_or(0),
            whole_batches: item.whole_batches,
        };
        match topics.iter_mut().find(|(name, _)| **name == *item.topic) {
            Some((_, specs)) => specs.push(spec),
            None => topics.push((item.topic.to_string(), vec![spec])),
        }
    }
    if topics.is_empty() {
        return Ok(Vec::new());
    }
    let body = RequestBody::Fetch {
        max_wait_ms: config.max_wait.as_millis().min(u128::from(u32::MAX)) as u32,
        min_bytes: config.min_bytes,
        max_bytes: config.max_bytes,
        topics,
    };
    let timeout = client.config().request_timeout + config.max_wait;
    match client.send_to(target, &body, Vec::new(), timeout).await? {
        ResponseBody::Fetch(topics) => Ok(topics),
        other => Err(unexpected("Fetch", &other)),
    }
}

fn take_result(
    results: &mut FetchResults,
    item: &FetchItem,
    offset: u64,
) -> Result<(u64, FetchPartitionResult)> {
    let topics = results.as_mut().map_err(|error| error.clone())?;
    let found = topics
        .iter_mut()
        .filter(|(name, _)| **name == *item.topic)
        .find_map(|(_, partitions)| {
            let position = partitions
                .iter()
                .position(|result| result.partition == item.partition)?;
            Some(partitions.swap_remove(position))
        });
    let result = found.ok_or_else(|| {
        Error::MalformedResponse(format!(
            "no fetch result for {}/{}",
            item.topic, item.partition
        ))
    })?;
    Ok((offset, result))
}
