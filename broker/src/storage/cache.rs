//! Per-shard tail cache: the most recently written frames of every log, bounded by
//! bytes, so that consumers reading near the tail never touch the disk.
//!
//! Frames are kept per log in offset order, so a read finds its frame with a binary
//! search and never walks other logs' frames. Eviction is global and oldest-first
//! (write order), through a queue of (log, sequence) tickets; frames removed by a
//! rollback leave stale tickets behind, which eviction skips.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use crate::types::{LogId, Offset};

struct Cached {
    seq: u64,
    base_offset: Offset,
    last_offset: Offset,
    frame: Bytes,
}

/// Recent frames per log, bounded by bytes.
pub struct TailCache {
    logs: HashMap<LogId, VecDeque<Cached>>,
    order: VecDeque<(LogId, u64)>,
    next_seq: u64,
    bytes: usize,
    capacity_bytes: usize,
    /// Reads that found their first frame cached.
    pub hits: u64,
    /// Reads that had to go to disk for their first frame.
    pub misses: u64,
}

impl TailCache {
    /// An empty cache holding at most `capacity_bytes`.
    pub fn new(capacity_bytes: usize) -> Self {
        TailCache {
            logs: HashMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
            bytes: 0,
            capacity_bytes,
            hits: 0,
            misses: 0,
        }
    }

    /// Adds a frame of `log` (offsets only increase within a log).
    pub fn insert(&mut self, log: LogId, base_offset: Offset, last_offset: Offset, frame: Bytes) {
        if self.capacity_bytes == 0 || frame.len() > self.capacity_bytes {
            // Too large to keep: drop the log's older frames too, so that what is
            // cached of a log is always contiguous.
            self.remove_log(log);
            return;
        }
        let frames = self.logs.entry(log).or_default();
        if frames
            .back()
            .is_some_and(|last| last.last_offset >= base_offset)
        {
            // Offsets went back (a rollback re-used them): drop what they replace.
            self.bytes -= drop_from(frames, base_offset);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += frame.len();
        frames.push_back(Cached {
            seq,
            base_offset,
            last_offset,
            frame,
        });
        self.order.push_back((log, seq));
        self.evict();
    }

    fn evict(&mut self) {
        while self.bytes > self.capacity_bytes {
            let Some((log, seq)) = self.order.pop_front() else {
                break;
            };
            let Some(frames) = self.logs.get_mut(&log) else {
                continue;
            };
            if frames.front().is_some_and(|first| first.seq == seq) {
                if let Some(evicted) = frames.pop_front() {
                    self.bytes -= evicted.frame.len();
                }
                if frames.is_empty() {
                    self.logs.remove(&log);
                }
            }
        }
        // Stale tickets (frames removed by rollbacks or log deletion) are skipped
        // above; compact them when they outnumber the live ones.
        let live: usize = self.logs.values().map(VecDeque::len).sum();
        if self.order.len() > 2 * live + 1024 {
            let logs = &self.logs;
            self.order.retain(|(log, seq)| {
                logs.get(log)
                    .is_some_and(|frames| frames.iter().any(|f| f.seq == *seq))
            });
        }
    }

    /// Whole frames of `log` from the one holding `offset` on, below `limit`
    /// (exclusive offset), up to `max_bytes` (at least one frame). `None` when the
    /// frame holding `offset` is not cached.
    pub fn get(
        &mut self,
        log: LogId,
        offset: Offset,
        limit: Offset,
        max_bytes: usize,
    ) -> Option<Vec<Bytes>> {
        let found = self.lookup(log, offset, limit, max_bytes);
        if found.is_some() {
            self.hits += 1;
        } else {
            self.misses += 1;
        }
        found
    }

    fn lookup(
        &self,
        log: LogId,
        offset: Offset,
        limit: Offset,
        max_bytes: usize,
    ) -> Option<Vec<Bytes>> {
        let frames = self.logs.get(&log)?;
        if frames.front()?.base_offset > offset {
            return None;
        }
        let start = frames.partition_point(|f| f.last_offset < offset);
        if frames.get(start)?.base_offset > offset {
            return None;
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut expected = frames[start].base_offset;
        for cached in frames.range(start..) {
            if cached.base_offset != expected
                || cached.base_offset >= limit
                || (!out.is_empty() && bytes + cached.frame.len() > max_bytes)
            {
                break;
            }
            expected = cached.last_offset + 1;
            bytes += cached.frame.len();
            out.push(cached.frame.clone());
        }
        (!out.is_empty()).then_some(out)
    }

    /// The first offset of `log` the cache holds.
    pub fn first_offset(&self, log: LogId) -> Option<Offset> {
        self.logs
            .get(&log)
            .and_then(|frames| frames.front())
            .map(|f| f.base_offset)
    }

    /// Drops `log`'s frames at or above `offset`.
    pub fn truncate(&mut self, log: LogId, offset: Offset) {
        if let Some(frames) = self.logs.get_mut(&log) {
            self.bytes -= drop_from(frames, offset);
        }
    }

    /// Drops every frame of `log`.
    pub fn remove_log(&mut self, log: LogId) {
        if let Some(frames) = self.logs.remove(&log) {
            self.bytes -= frames.iter().map(|f| f.frame.len()).sum::<usize>();
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Pops frames whose base offset is at or above `offset`; returns their bytes.
fn drop_from(frames: &mut VecDeque<Cached>, offset: Offset) -> usize {
    let mut dropped = 0;
    while frames.back().is_some_and(|last| last.base_offset >= offset) {
        if let Some(frame) = frames.pop_back() {
            dropped += frame.frame.len();
        }
    }
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(bytes: usize) -> Bytes {
        Bytes::from(vec![0u8; bytes])
    }

    #[test]
    fn reads_find_their_frame_and_respect_limits() {
        let mut cache = TailCache::new(1 << 20);
        for i in 0..10u64 {
            cache.insert(LogId(1), i * 10, i * 10 + 9, frame(100));
            cache.insert(LogId(2), i, i, frame(50));
        }
        let got = cache.get(LogId(1), 35, 1000, 250).unwrap();
        assert_eq!(
            got.len(),
            2,
            "budget of 250 bytes holds two 100-byte frames"
        );
        assert_eq!(cache.get(LogId(1), 35, 40, 10_000).unwrap().len(), 1);
        assert!(cache.get(LogId(3), 0, 10, 10).is_none());
        // At least one frame even when it exceeds the budget.
        assert_eq!(cache.get(LogId(1), 0, 1000, 1).unwrap().len(), 1);
    }

    #[test]
    fn eviction_is_oldest_first_across_logs_and_skips_removed_frames() {
        let mut cache = TailCache::new(1000);
        for i in 0..10u64 {
            cache.insert(LogId(1), i, i, frame(100));
        }
        cache.truncate(LogId(1), 8);
        assert_eq!(cache.bytes(), 800);
        cache.insert(LogId(2), 0, 0, frame(300));
        assert_eq!(cache.bytes(), 1000);
        cache.insert(LogId(2), 1, 1, frame(100));
        // Frames 0 and 1 of log 1 were the oldest.
        assert_eq!(cache.first_offset(LogId(1)), Some(2));
        assert_eq!(cache.bytes(), 1000);
        cache.remove_log(LogId(2));
        assert_eq!(cache.bytes(), 600);
    }
}
