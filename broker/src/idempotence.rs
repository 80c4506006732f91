//! Idempotent produce: per partition log, the last `BATCHES_PER_PRODUCER` batches
//! of each producer id (first and last sequence, base offset), kept by the
//! partition's owning shard (its leader, in a cluster).
//!
//! A batch that repeats one of them exactly is answered with its original offsets
//! and not appended again; a batch whose first sequence is not the one after the
//! producer's last is refused with `OutOfOrderSequence`; an older producer epoch
//! gets `InvalidProducerEpoch`. The state is rebuilt after a restart or a
//! leadership change from the producer fields every stored batch header carries,
//! by reading the partition's last minute of batches (at most
//! `REBUILD_BYTES_MAX`); a producer not seen there is unknown, and its next batch
//! is accepted with any sequence.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use sluice_schema::batch;
use sluice_schema::wire::ErrorCode;

use crate::shard_messages::ApiError;
use crate::storage::format::BatchInfo;
use crate::storage::Appended;
use crate::types::LogId;

/// Batches remembered per producer per partition (Kafka keeps 5; 16 lets a
/// producer keep 8 requests of 2 batches in flight per partition).
pub const BATCHES_PER_PRODUCER: usize = 16;
/// Producers remembered per partition; the least recently used is forgotten.
pub const PRODUCERS_PER_LOG_MAX: usize = 10_000;
/// How far back (by batch timestamp) the state is rebuilt after a restart.
pub const REBUILD_WINDOW_MS: i64 = 60_000;
/// Bytes read at most to rebuild one partition's state.
pub const REBUILD_BYTES_MAX: usize = 64 << 20;

/// A batch's producer fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProducerFields {
    /// Producer id (>= 0).
    pub producer_id: i64,
    /// Epoch.
    pub epoch: i16,
    /// First sequence.
    pub first_seq: i32,
    /// Last sequence.
    pub last_seq: i32,
}

/// The producer fields of a batch frame, if it is idempotent.
pub fn producer_fields(frame: &[u8]) -> Option<ProducerFields> {
    if frame.len() < batch::HEADER_BYTES {
        return None;
    }
    let producer_id = i64::from_le_bytes(frame[batch::PRODUCER_ID_OFFSET..][..8].try_into().ok()?);
    if producer_id < 0 {
        return None;
    }
    let epoch = i16::from_le_bytes(frame[batch::PRODUCER_EPOCH_OFFSET..][..2].try_into().ok()?);
    let first_seq = i32::from_le_bytes(frame[batch::BASE_SEQUENCE_OFFSET..][..4].try_into().ok()?);
    let count = u32::from_le_bytes(frame[batch::RECORD_COUNT_OFFSET..][..4].try_into().ok()?);
    let last_seq = add_seq(first_seq, count.saturating_sub(1));
    Some(ProducerFields {
        producer_id,
        epoch,
        first_seq,
        last_seq,
    })
}

/// Sequences wrap from `i32::MAX` to 0.
fn add_seq(seq: i32, n: u32) -> i32 {
    ((i64::from(seq.max(0)) + i64::from(n)) % (i64::from(i32::MAX) + 1)) as i32
}

#[derive(Clone, Debug)]
struct Cached {
    first_seq: i32,
    last_seq: i32,
    /// None while the append is in flight.
    base_offset: Option<u64>,
    records: u32,
    token: u64,
}

#[derive(Debug, Default)]
struct ProducerState {
    epoch: i16,
    batches: VecDeque<Cached>,
    used: u64,
}

#[derive(Default)]
struct LogProducers {
    term: u64,
    producers: HashMap<i64, ProducerState>,
    /// Every producer that ever wrote to the log is known (the rebuild read the
    /// whole log and nothing was forgotten since): an unknown producer is new,
    /// and its first batch must have sequence 0.
    complete: bool,
}

/// What a produce should do.
pub enum Check {
    /// Append; then call [`Producers::complete`] with these tokens.
    Append(Vec<(i64, u64)>),
    /// Every batch is a duplicate: answer this without appending.
    Duplicate(Appended),
}

/// The shard's producer state, by log.
pub struct Producers {
    logs: RefCell<HashMap<LogId, LogProducers>>,
    clock: std::cell::Cell<u64>,
    /// Serializes rebuilds.
    pub rebuild_lock: std::rc::Rc<glommio::sync::Semaphore>,
}

impl Default for Producers {
    fn default() -> Self {
        Producers::new()
    }
}

impl Producers {
    /// An empty state.
    pub fn new() -> Producers {
        Producers {
            logs: RefCell::new(HashMap::new()),
            clock: std::cell::Cell::new(0),
            rebuild_lock: std::rc::Rc::new(glommio::sync::Semaphore::new(1)),
        }
    }

    /// The log's state is current for `term`.
    pub fn is_loaded(&self, log: LogId, term: u64) -> bool {
        self.logs.borrow().get(&log).is_some_and(|l| l.term == term)
    }

    /// Installs a rebuilt state: `batches` are stored batch frames in offset
    /// order; `complete` when they are the whole log.
    pub fn install(&self, log: LogId, term: u64, frames: &[Bytes], complete: bool) {
        let mut state = LogProducers {
            term,
            producers: HashMap::new(),
            complete,
        };
        for frame in frames {
            let Some(fields) = producer_fields(frame) else {
                continue;
            };
            let base = u64::from_le_bytes(
                frame[batch::BASE_OFFSET_OFFSET..][..8]
                    .try_into()
                    .expect("8 bytes"),
            );
            let records = u32::from_le_bytes(
                frame[batch::RECORD_COUNT_OFFSET..][..4]
                    .try_into()
                    .expect("4"),
            );
            let producer = state.producers.entry(fields.producer_id).or_default();
            if fields.epoch > producer.epoch {
                producer.batches.clear();
                producer.epoch = fields.epoch;
            }
            producer.batches.push_back(Cached {
                first_seq: fields.first_seq,
                last_seq: fields.last_seq,
                base_offset: Some(base),
                records,
                token: 0,
            });
            while producer.batches.len() > BATCHES_PER_PRODUCER {
                producer.batches.pop_front();
            }
        }
        self.logs.borrow_mut().insert(log, state);
    }

    /// Forgets a log.
    pub fn forget(&self, log: LogId) {
        self.logs.borrow_mut().remove(&log);
    }

    /// Checks the batches of one produce and registers the new ones as in flight.
    pub fn check(
        &self,
        log: LogId,
        batches: &[(Bytes, BatchInfo)],
        log_start: u64,
    ) -> Result<Check, ApiError> {
        let mut logs = self.logs.borrow_mut();
        let state = logs.entry(log).or_default();
        let mut tokens = Vec::new();
        let mut duplicates: Vec<(u64, u64)> = Vec::new();
        for (index, (frame, _)) in batches.iter().enumerate() {
            let Some(fields) = producer_fields(frame) else {
                if !duplicates.is_empty() {
                    return Err(mixed());
                }
                continue;
            };
            self.clock.set(self.clock.get() + 1);
            let now = self.clock.get();
            if !state.producers.contains_key(&fields.producer_id)
                && state.producers.len() >= PRODUCERS_PER_LOG_MAX
            {
                if let Some(oldest) = state
                    .producers
                    .iter()
                    .filter(|(_, p)| p.batches.iter().all(|b| b.base_offset.is_some()))
                    .min_by_key(|(_, p)| p.used)
                    .map(|(id, _)| *id)
                {
                    state.producers.remove(&oldest);
                    state.complete = false;
                }
            }
            let known = state.producers.contains_key(&fields.producer_id);
            if !known && state.complete && fields.first_seq != 0 {
                // A new producer starts at 0; a later batch arriving first means
                // an earlier one is still on its way (it is retried in order).
                return Err(ApiError::new(
                    ErrorCode::OutOfOrderSequence,
                    format!(
                        "producer {} is new on this partition and sent sequence {} first; the first batch must have sequence 0",
                        fields.producer_id, fields.first_seq
                    ),
                ));
            }
            let producer = state.producers.entry(fields.producer_id).or_default();
            producer.used = now;
            if fields.epoch < producer.epoch {
                return Err(ApiError::new(
                    ErrorCode::InvalidProducerEpoch,
                    format!(
                        "producer {} epoch {} is older than its current epoch {}",
                        fields.producer_id, fields.epoch, producer.epoch
                    ),
                ));
            }
            if fields.epoch > producer.epoch {
                producer.epoch = fields.epoch;
                producer.batches.clear();
            }
            if let Some(cached) = producer
                .batches
                .iter()
                .find(|b| b.first_seq == fields.first_seq && b.last_seq == fields.last_seq)
            {
                let Some(base) = cached.base_offset else {
                    return Err(ApiError::new(
                        ErrorCode::RequestTimedOut,
                        "an earlier copy of this batch is still being written; retry",
                    ));
                };
                if index != duplicates.len() {
                    return Err(mixed());
                }
                duplicates.push((base, base + u64::from(cached.records.saturating_sub(1))));
                continue;
            }
            if !duplicates.is_empty() {
                return Err(mixed());
            }
            if let Some(last) = producer.batches.back() {
                let expected = add_seq(last.last_seq, 1);
                if fields.first_seq != expected {
                    return Err(ApiError::new(
                        ErrorCode::OutOfOrderSequence,
                        format!(
                            "producer {} sent sequence {} but the next expected is {expected}",
                            fields.producer_id, fields.first_seq
                        ),
                    ));
                }
            }
            let token = now;
            producer.batches.push_back(Cached {
                first_seq: fields.first_seq,
                last_seq: fields.last_seq,
                base_offset: None,
                records: fields.last_seq.wrapping_sub(fields.first_seq) as u32 + 1,
                token,
            });
            while producer.batches.len() > BATCHES_PER_PRODUCER {
                producer.batches.pop_front();
            }
            tokens.push((fields.producer_id, token));
        }
        if !duplicates.is_empty() {
            if duplicates.len() != batches.len() {
                return Err(mixed());
            }
            return Ok(Check::Duplicate(Appended {
                base_offset: duplicates[0].0,
                last_offset: duplicates[duplicates.len() - 1].1,
                log_start,
            }));
        }
        Ok(Check::Append(tokens))
    }

    /// After the append: records the batches' offsets, or forgets them if it failed.
    pub fn complete(
        &self,
        log: LogId,
        tokens: &[(i64, u64)],
        batches: &[(Bytes, BatchInfo)],
        appended: Option<&Appended>,
    ) {
        let mut logs = self.logs.borrow_mut();
        let Some(state) = logs.get_mut(&log) else {
            return;
        };
        let mut next = appended.map(|a| a.base_offset);
        let mut tokens = tokens.iter();
        for (frame, info) in batches {
            let base = next;
            next = next.map(|n| n + u64::from(info.record_count));
            if producer_fields(frame).is_none() {
                continue;
            }
            let Some((producer_id, token)) = tokens.next() else {
                break;
            };
            let Some(producer) = state.producers.get_mut(producer_id) else {
                continue;
            };
            match base {
                Some(base) => {
                    if let Some(cached) = producer.batches.iter_mut().find(|b| b.token == *token) {
                        cached.base_offset = Some(base);
                    }
                }
                None => producer.batches.retain(|b| b.token != *token),
            }
        }
    }
}

fn mixed() -> ApiError {
    ApiError::new(
        ErrorCode::OutOfOrderSequence,
        "the request mixes batches already written with new ones; send them separately",
    )
}
