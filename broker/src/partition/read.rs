//! Reads from a partition: fetches bounded by the high watermark, long-polling
//! fetches that wait for it to move, and offset lookups.

use std::time::Duration;

use crate::shard::Shard;
use crate::shard_messages::{ApiError, ListedOffset, OffsetQuery, PartitionRead};
use crate::storage::ReadBatches;
use crate::types::LogId;

impl Shard {
    /// Reads logs of this shard in order, each within its own budget and all
    /// within `budget`: a read after the budget is spent returns no frames (only
    /// the log's offsets), and only the first read that finds data may exceed its
    /// share by one batch.
    pub async fn read_many(
        &self,
        reads: &[PartitionRead],
        budget: usize,
    ) -> Vec<Result<ReadBatches, ApiError>> {
        let mut remaining = budget;
        let mut results = Vec::with_capacity(reads.len());
        for read in reads {
            let state = match self.serving(read.log) {
                Ok(state) => state,
                Err(error) => {
                    self.metrics()
                        .fetch_partition_errors
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    results.push(Err(error));
                    continue;
                }
            };
            let result = if remaining == 0 {
                Ok(ReadBatches {
                    high_watermark: state.high_watermark,
                    log_start: state.log_start,
                    ..ReadBatches::default()
                })
            } else {
                let limit = read.max_bytes.min(remaining);
                self.wal
                    .read_range(
                        read.log,
                        read.offset,
                        limit,
                        state.high_watermark,
                        read.range,
                    )
                    .await
                    .map_err(ApiError::from)
            };
            match &result {
                Ok(read) => remaining = remaining.saturating_sub(read.bytes),
                Err(_) => {
                    self.metrics()
                        .fetch_partition_errors
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            results.push(result);
        }
        results
    }

    /// Waits until `log`'s high watermark moves past `seen_high_watermark`, the
    /// log goes away, shutdown starts, or `wait` elapses. Never busy-polls: it
    /// sleeps on the WAL's notifications (durable appends on a local log, commit
    /// points on a replicated one), and returns at once if this replica stops
    /// serving the partition (the fetch then learns why).
    pub async fn wait_for_data(&self, log: LogId, seen_high_watermark: u64, wait: Duration) {
        let deadline = std::time::Instant::now() + wait;
        loop {
            match self.serving(log) {
                Ok(state) if state.high_watermark <= seen_high_watermark => {}
                _ => return,
            }
            let now = std::time::Instant::now();
            if now >= deadline || self.shutting_down() {
                return;
            }
            let _ = glommio::timer::timeout(deadline - now, async {
                self.wal.durable_advanced().await;
                Ok(())
            })
            .await;
        }
    }

    /// The offset `query` names, on a partition this replica serves.
    pub fn list_offset(&self, log: LogId, query: OffsetQuery) -> Result<ListedOffset, ApiError> {
        let state = self.serving(log)?;
        let (log_start, high_watermark) = (state.log_start, state.high_watermark);
        let (offset, timestamp_ms) = match query {
            OffsetQuery::Earliest => (log_start, -1),
            OffsetQuery::Latest => (high_watermark, -1),
            OffsetQuery::Timestamp(ts) => self
                .wal
                .offset_for_timestamp(log, ts)?
                .filter(|(offset, _)| *offset < high_watermark)
                .unwrap_or((high_watermark, -1)),
        };
        Ok(ListedOffset {
            offset,
            timestamp_ms,
            log_start,
            high_watermark,
        })
    }
}
