//! Appends to a partition: idempotent producers deduplicated, then a local
//! append or a proposal to the partition's Raft group, answered per `acks`.

use bytes::Bytes;
use sluice_schema::wire::ErrorCode;

use super::{AckMode, GroupId, ReplicaError};
use crate::shard::Shard;
use crate::shard_messages::ApiError;
use crate::storage::format::BatchInfo;
use crate::storage::Appended;
use crate::types::{Epoch, LogId};

impl Shard {
    /// Appends to a log of this shard (through its Raft group in a cluster),
    /// deduplicating the batches of idempotent producers; counts the outcome.
    pub(crate) async fn produce(
        &self,
        log: LogId,
        batches: &[(Bytes, BatchInfo)],
        acks: i8,
    ) -> Result<Appended, ApiError> {
        let result = self.append_once(log, batches, acks).await;
        use std::sync::atomic::Ordering::Relaxed;
        let metrics = self.metrics();
        match &result {
            Ok(_) => {
                let bytes: usize = batches.iter().map(|(frame, _)| frame.len()).sum();
                let records: u64 = batches.iter().map(|(_, i)| u64::from(i.record_count)).sum();
                metrics.produced_bytes.fetch_add(bytes as u64, Relaxed);
                metrics.produced_records.fetch_add(records, Relaxed);
            }
            Err(error) => {
                metrics.produce_partition_errors.fetch_add(1, Relaxed);
                tracing::debug!(%log, code = ?error.code, message = %error.message, "produce refused");
            }
        }
        result
    }

    /// The append itself: a batch an idempotent producer already had appended is
    /// answered with its original offsets instead.
    async fn append_once(
        &self,
        log: LogId,
        batches: &[(Bytes, BatchInfo)],
        acks: i8,
    ) -> Result<Appended, ApiError> {
        let idempotent = batches
            .iter()
            .any(|(frame, _)| crate::idempotence::producer_fields(frame).is_some());
        let mut tokens = Vec::new();
        if idempotent {
            let state = self.serving(log)?;
            self.rebuild_producers(log).await?;
            match self.producers.check(log, batches, state.log_start)? {
                crate::idempotence::Check::Duplicate(appended) => return Ok(appended),
                crate::idempotence::Check::Append(fresh) => tokens = fresh,
            }
        }
        let group = self.partition_state(log)?.group;
        let result = match group {
            Some(group) => self.produce_replicated(group, log, batches, acks).await,
            None => self
                .wal
                .append(log, Epoch(0), batches)
                .await
                .map_err(ApiError::from),
        };
        if !tokens.is_empty() {
            self.producers
                .complete(log, &tokens, batches, result.as_ref().ok());
        }
        result
    }

    /// Rebuilds a log's idempotent-producer state from its recent batches, once
    /// per process and leadership term.
    async fn rebuild_producers(&self, log: LogId) -> Result<(), ApiError> {
        use crate::idempotence::{REBUILD_BYTES_MAX, REBUILD_WINDOW_MS};
        let term = self.leader_term(log);
        if self.producers.is_loaded(log, term) {
            return Ok(());
        }
        let _permit = self
            .producers
            .rebuild_lock
            .acquire_permit(1)
            .await
            .map_err(|_| ApiError::new(ErrorCode::ShuttingDown, "shutting down"))?;
        if self.producers.is_loaded(log, term) {
            return Ok(());
        }
        let state = self.serving(log)?;
        let (log_start, high_watermark) = (state.log_start, state.high_watermark);
        let since = crate::storage::now_ms() - REBUILD_WINDOW_MS;
        let mut frames = Vec::new();
        // Complete: the whole log is read, so a producer not found is new.
        let mut complete = log_start == high_watermark;
        if let Some((mut offset, _)) = self.wal.offset_for_timestamp(log, since)? {
            complete = offset <= log_start;
            let mut bytes = 0;
            while offset < high_watermark && bytes < REBUILD_BYTES_MAX {
                let read = self
                    .wal
                    .read_below(log, offset, 4 << 20, high_watermark)
                    .await?;
                if read.frames.is_empty() {
                    break;
                }
                for frame in read.frames {
                    if let Ok(header) = crate::storage::format::header(&frame) {
                        offset = offset
                            .max(header.base_offset.get() + u64::from(header.record_count.get()));
                    }
                    bytes += frame.len();
                    frames.push(frame);
                }
            }
            complete &= offset >= high_watermark;
        }
        self.producers.install(log, term, &frames, complete);
        Ok(())
    }

    /// Appends to a replicated log: proposes to its group and waits as `acks` says.
    async fn produce_replicated(
        &self,
        group: GroupId,
        log: LogId,
        batches: &[(Bytes, BatchInfo)],
        acks: i8,
    ) -> Result<Appended, ApiError> {
        let cluster = self.cluster();
        let bytes: usize = batches.iter().map(|(b, _)| b.len()).sum();
        self.wal
            .wait_for_space(bytes)
            .await
            .map_err(ApiError::from)?;
        let mode = if acks == -1 {
            AckMode::Quorum
        } else {
            AckMode::Leader
        };
        let slot = cluster
            .host
            .propose(group, batches, mode)
            .map_err(|e| self.replica_error(group, e))?;
        let acked = slot
            .wait()
            .await
            .map_err(|e| self.replica_error(group, e))?;
        let log_start = self.wal.log_offsets(log).map(|o| o.0).unwrap_or(0);
        Ok(Appended {
            base_offset: acked.base_offset,
            last_offset: acked.end_offset.saturating_sub(1),
            log_start,
        })
    }

    fn replica_error(&self, group: GroupId, error: ReplicaError) -> ApiError {
        match error {
            ReplicaError::NotLeader(_) => self.not_leader(group, &format!("partition {group}")),
            ReplicaError::Busy => ApiError::new(
                ErrorCode::RequestTimedOut,
                format!("partition {group} has too much waiting for replication; retry"),
            ),
            ReplicaError::Invalid(message) => ApiError::new(ErrorCode::InvalidBatch, message),
            ReplicaError::Storage(message) => ApiError::new(ErrorCode::StorageError, message),
        }
    }
}
