//! Per-shard tail cache: the most recent stamped frames, by WAL position, so that
//! consumers reading near the tail never touch the disk.

use std::collections::VecDeque;

use bytes::Bytes;

use super::index::WalPosition;

/// Recent frames in WAL-position order, bounded by bytes.
pub struct TailCache {
    entries: VecDeque<(WalPosition, Bytes)>,
    bytes: usize,
    capacity_bytes: usize,
    /// Lookups that found their whole run cached.
    pub hits: u64,
    /// Lookups that had to go to disk.
    pub misses: u64,
}

impl TailCache {
    /// An empty cache holding at most `capacity_bytes`.
    pub fn new(capacity_bytes: usize) -> Self {
        TailCache {
            entries: VecDeque::new(),
            bytes: 0,
            capacity_bytes,
            hits: 0,
            misses: 0,
        }
    }

    /// Adds a frame written at `position` (positions only increase).
    pub fn insert(&mut self, position: WalPosition, frame: Bytes) {
        if self.capacity_bytes == 0 {
            return;
        }
        debug_assert!(self.entries.back().is_none_or(|(last, _)| *last < position));
        self.bytes += frame.len();
        self.entries.push_back((position, frame));
        while self.bytes > self.capacity_bytes {
            match self.entries.pop_front() {
                Some((_, evicted)) => self.bytes -= evicted.len(),
                None => break,
            }
        }
    }

    /// The frames covering exactly `[position, position + bytes)`, if all cached.
    pub fn get_run(&mut self, position: WalPosition, bytes: u32) -> Option<Vec<Bytes>> {
        let found = self.lookup(position, bytes);
        if found.is_some() {
            self.hits += 1;
        } else {
            self.misses += 1;
        }
        found
    }

    fn lookup(&self, position: WalPosition, bytes: u32) -> Option<Vec<Bytes>> {
        let start = self.entries.partition_point(|(p, _)| *p < position);
        let end = position.0 + u64::from(bytes);
        let mut expected = position.0;
        let mut frames = Vec::new();
        for (at, frame) in self.entries.range(start..) {
            if expected >= end {
                break;
            }
            if at.0 != expected {
                return None;
            }
            frames.push(frame.clone());
            expected += frame.len() as u64;
        }
        (expected == end).then_some(frames)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}
