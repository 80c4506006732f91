//! A replica's Raft log as raft-rs sees it (`raft::Storage`), over the shard WAL.
//!
//! raft-rs reads its log synchronously (`term`, `entries`, `first_index`,
//! `last_index`) and requires entries handed to it in a `Ready` to be readable
//! before they are durable. So this keeps, in memory:
//!
//! - the bounds: first and last index, the term of the entry before the first;
//! - every term change (`terms`), so `term(i)` answers for the whole log in a
//!   handful of bytes;
//! - a cache of the newest entries: always every entry above the applied index
//!   (raft-rs reads committed entries for a `Ready` synchronously), plus older
//!   ones within a byte budget, so a follower that keeps up is fed from memory.
//!
//! Older entries (a follower catching up) are read from the WAL asynchronously:
//! `entries` answers `LogTemporarilyUnavailable`, the driver reads them and calls
//! `on_entries_fetched`, and raft-rs asks again and finds them in `fetched`.

use std::cell::RefCell;
use std::collections::VecDeque;

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::limits::RAFT_ENTRY_CACHE_BYTES;

/// A read of older entries raft-rs asked for and the driver must fetch.
pub struct FetchRequest {
    /// First index wanted.
    pub low: u64,
    /// One past the last index wanted.
    pub high: u64,
    /// Bytes raft-rs wants at most.
    pub max_bytes: u64,
    /// raft-rs's context, handed back with `on_entries_fetched`.
    pub context: GetEntriesContext,
}

/// The in-memory view of one replica's log.
pub struct RaftLog {
    first_index: u64,
    last_index: u64,
    /// Term of entry `first_index - 1`.
    start_term: u64,
    /// `(first index, term)` of every term present, ascending.
    terms: Vec<(u64, u64)>,
    /// Entries `[cache_first, last_index]`.
    cache: VecDeque<Entry>,
    cache_bytes: usize,
    hard_state: HardState,
    conf_state: ConfState,
    applied: u64,
    /// Offset of the log's first retained record (for snapshots).
    start_offset: u64,
    /// Reads raft-rs asked for (answered `LogTemporarilyUnavailable`).
    pending_fetches: RefCell<Vec<FetchRequest>>,
    /// Entries fetched for a pending request, served once.
    fetched: RefCell<Option<Vec<Entry>>>,
}

/// What the WAL recovered for a replica's log.
#[derive(Clone, Debug, Default)]
pub struct Recovered {
    /// First index present.
    pub first_index: u64,
    /// Last index present (first - 1 when empty).
    pub last_index: u64,
    /// Term of `first_index - 1`.
    pub start_term: u64,
    /// Term changes.
    pub terms: Vec<(u64, u64)>,
    /// Durable hard state.
    pub hard_state: crate::storage::HardState,
    /// Offset of the first retained record.
    pub start_offset: u64,
    /// Entries above the applied index, read back (the cache must hold them).
    pub uncommitted: Vec<Entry>,
}

impl RaftLog {
    /// A log for a group with voters `voters` over what the WAL recovered, applied
    /// up to `applied` (entries after it are in `recovered.uncommitted`).
    pub fn new(voters: &[u64], recovered: Recovered, applied: u64) -> RaftLog {
        let mut hard_state = HardState::default();
        hard_state.term = recovered.hard_state.term;
        hard_state.vote = recovered.hard_state.vote;
        hard_state.commit = recovered
            .hard_state
            .commit
            .min(recovered.last_index)
            .max(recovered.first_index.saturating_sub(1));
        let mut conf_state = ConfState::default();
        conf_state.voters = voters.to_vec();
        let applied = applied.min(hard_state.commit);
        let mut log = RaftLog {
            first_index: recovered.first_index.max(1),
            last_index: recovered.last_index,
            start_term: recovered.start_term,
            terms: recovered.terms,
            cache: VecDeque::new(),
            cache_bytes: 0,
            hard_state,
            conf_state,
            applied,
            start_offset: recovered.start_offset,
            pending_fetches: RefCell::new(Vec::new()),
            fetched: RefCell::new(None),
        };
        for entry in recovered.uncommitted {
            log.push_cached(entry);
        }
        debug_assert!(log.cache_covers_unapplied());
        log
    }

    /// Index of the last entry (appended, maybe not yet durable).
    pub fn last(&self) -> u64 {
        self.last_index
    }

    /// Index of the first entry present.
    pub fn first(&self) -> u64 {
        self.first_index
    }

    /// The hard state as last handed to the WAL.
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// Records a new hard state (its `State` frame is written with the same Ready).
    pub fn set_hard_state(&mut self, hard_state: HardState) {
        self.hard_state = hard_state;
    }

    /// Term of `index` (None outside `[first - 1, last]`).
    pub fn term_of(&self, index: u64) -> Option<u64> {
        if index + 1 == self.first_index {
            return Some(self.start_term);
        }
        if index < self.first_index || index > self.last_index {
            return None;
        }
        let at = self.terms.partition_point(|(first, _)| *first <= index);
        at.checked_sub(1).map(|i| self.terms[i].1)
    }

    /// A cached entry.
    pub fn cached(&self, index: u64) -> Option<&Entry> {
        let first = self.cache.front()?.index;
        self.cache
            .get(usize::try_from(index.checked_sub(first)?).ok()?)
    }

    /// Appends entries from a Ready. The first may replace the suffix from its
    /// index on (a follower's conflict); returns the index truncated from, if any.
    pub fn append(&mut self, entries: &[Entry]) -> Option<u64> {
        let first = entries.first()?;
        let truncated = (first.index <= self.last_index).then_some(first.index);
        if let Some(from) = truncated {
            assert!(
                from > self.hard_state.commit,
                "raft truncates at {from}, at or below the commit index {}",
                self.hard_state.commit
            );
            self.truncate_from(from);
        }
        assert_eq!(
            first.index,
            self.last_index + 1,
            "entries must continue the log"
        );
        for entry in entries {
            let term = entry.term;
            if self.terms.last().is_none_or(|(_, last)| *last != term) {
                self.terms.push((entry.index, term));
            }
            self.last_index = entry.index;
            self.push_cached(entry.clone());
        }
        truncated
    }

    fn truncate_from(&mut self, from: u64) {
        while self.cache.back().is_some_and(|e| e.index >= from) {
            if let Some(entry) = self.cache.pop_back() {
                self.cache_bytes -= entry_bytes(&entry);
            }
        }
        while self.terms.last().is_some_and(|(first, _)| *first >= from) {
            self.terms.pop();
        }
        self.last_index = from - 1;
    }

    /// Replaces the whole log with a snapshot's position.
    pub fn reset(&mut self, snapshot: &Snapshot, start_offset: u64) {
        let metadata = snapshot.get_metadata();
        self.cache.clear();
        self.cache_bytes = 0;
        self.terms.clear();
        self.first_index = metadata.index + 1;
        self.last_index = metadata.index;
        self.start_term = metadata.term;
        self.start_offset = start_offset;
        self.conf_state = metadata.get_conf_state().clone();
        self.hard_state.commit = self.hard_state.commit.max(metadata.index);
        self.applied = metadata.index;
    }

    /// Notes that entries up to `index` are applied; cached entries at or below it
    /// may go once the cache is over its budget.
    pub fn set_applied(&mut self, index: u64) {
        self.applied = self.applied.max(index);
        while self.cache_bytes > RAFT_ENTRY_CACHE_BYTES
            && self.cache.front().is_some_and(|e| e.index <= self.applied)
        {
            if let Some(entry) = self.cache.pop_front() {
                self.cache_bytes -= entry_bytes(&entry);
            }
        }
    }

    /// Moves the first index up (retention dropped entries below it).
    pub fn compact_to(&mut self, first_index: u64, start_term: u64, start_offset: u64) {
        if first_index <= self.first_index || first_index > self.applied + 1 {
            return;
        }
        self.first_index = first_index;
        self.start_term = start_term;
        self.start_offset = start_offset;
        while self.terms.len() > 1 && self.terms[1].0 <= first_index {
            self.terms.remove(0);
        }
        while self.cache.front().is_some_and(|e| e.index < first_index) {
            if let Some(entry) = self.cache.pop_front() {
                self.cache_bytes -= entry_bytes(&entry);
            }
        }
    }

    fn push_cached(&mut self, entry: Entry) {
        if let Some(back) = self.cache.back() {
            if back.index + 1 != entry.index {
                // A gap (after a reset): the cache restarts here.
                self.cache.clear();
                self.cache_bytes = 0;
            }
        }
        self.cache_bytes += entry_bytes(&entry);
        self.cache.push_back(entry);
    }

    fn cache_covers_unapplied(&self) -> bool {
        self.applied >= self.last_index
            || self
                .cache
                .front()
                .is_some_and(|e| e.index <= self.applied + 1)
    }

    /// Reads raft-rs asked for since the last call.
    pub fn take_fetch_requests(&self) -> Vec<FetchRequest> {
        std::mem::take(&mut *self.pending_fetches.borrow_mut())
    }

    /// Hands over entries read for a fetch request (served to the next `entries`).
    pub fn set_fetched(&self, entries: Vec<Entry>) {
        *self.fetched.borrow_mut() = Some(entries);
    }

    fn take_fetched(&self, low: u64, high: u64, max_bytes: u64) -> Option<Vec<Entry>> {
        let fetched = self.fetched.borrow_mut().take()?;
        if fetched.first().map(|e| e.index) != Some(low) {
            return None;
        }
        Some(limit(
            fetched.into_iter().filter(|e| e.index < high),
            max_bytes,
        ))
    }
}

/// Bytes an entry holds in memory.
fn entry_bytes(entry: &Entry) -> usize {
    entry.data.len() + entry.context.len() + 64
}

/// Entries up to `max_bytes` (always at least one).
fn limit(entries: impl Iterator<Item = Entry>, max_bytes: u64) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut bytes = 0u64;
    for entry in entries {
        bytes += entry_bytes(&entry) as u64;
        if !out.is_empty() && bytes > max_bytes {
            break;
        }
        out.push(entry);
    }
    out
}

impl raft::Storage for RaftLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hard_state.clone(),
            conf_state: self.conf_state.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_bytes = max_size.into().unwrap_or(u64::MAX);
        if low < self.first_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        if low >= high {
            return Ok(Vec::new());
        }
        if let Some(first_cached) = self.cache.front().map(|e| e.index) {
            if low >= first_cached {
                let skip = (low - first_cached) as usize;
                let take = (high - low) as usize;
                let entries = self.cache.iter().skip(skip).take(take).cloned();
                return Ok(limit(entries, max_bytes));
            }
        }
        if let Some(entries) = self.take_fetched(low, high, max_bytes) {
            return Ok(entries);
        }
        if !context.can_async() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        self.pending_fetches.borrow_mut().push(FetchRequest {
            low,
            high,
            max_bytes,
            context,
        });
        Err(raft::Error::Store(StorageError::LogTemporarilyUnavailable))
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        if index + 1 < self.first_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        self.term_of(index)
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first_index)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // A partition's state is its log: a snapshot only says where the log starts
        // now (retention dropped what came before), so a follower that is that far
        // behind restarts its log there.
        let index = self.first_index - 1;
        if index < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut snapshot = Snapshot::default();
        snapshot.data = self.start_offset.to_le_bytes().to_vec().into();
        let metadata = snapshot.mut_metadata();
        metadata.index = index;
        metadata.term = self.start_term;
        metadata.set_conf_state(self.conf_state.clone());
        Ok(snapshot)
    }
}

/// The start offset a snapshot from [`RaftLog::snapshot`] carries.
pub fn snapshot_start_offset(snapshot: &Snapshot) -> Option<u64> {
    let bytes: [u8; 8] = snapshot.data.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64, bytes: usize) -> Entry {
        let mut entry = Entry::default();
        entry.index = index;
        entry.term = term;
        entry.data = vec![0u8; bytes].into();
        entry
    }

    fn empty() -> RaftLog {
        RaftLog::new(
            &[1, 2, 3],
            Recovered {
                first_index: 1,
                last_index: 0,
                ..Recovered::default()
            },
            0,
        )
    }

    #[test]
    fn terms_answer_across_the_log_and_truncation_drops_them() {
        let mut log = empty();
        assert_eq!(log.term(0).unwrap(), 0);
        log.append(&[entry(1, 1, 10), entry(2, 1, 10), entry(3, 2, 10)]);
        assert_eq!(log.term(2).unwrap(), 1);
        assert_eq!(log.term(3).unwrap(), 2);
        assert!(log.term(4).is_err());
        assert_eq!(log.append(&[entry(3, 3, 10), entry(4, 3, 10)]), Some(3));
        assert_eq!(log.term(3).unwrap(), 3);
        assert_eq!(log.last(), 4);
        let got = log
            .entries(1, 5, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(got.iter().map(|e| e.term).collect::<Vec<_>>(), [1, 1, 3, 3]);
    }

    #[test]
    fn old_entries_are_fetched_asynchronously() {
        let mut log = empty();
        let big = RAFT_ENTRY_CACHE_BYTES / 4;
        for index in 1..=8 {
            log.append(&[entry(index, 1, big)]);
        }
        log.set_applied(8);
        assert!(log.cached(1).is_none(), "applied entries left the cache");
        let error = log
            .entries(1, 3, None, GetEntriesContext::empty(true))
            .unwrap_err();
        assert!(matches!(
            error,
            raft::Error::Store(StorageError::LogTemporarilyUnavailable)
        ));
        let requests = log.take_fetch_requests();
        assert_eq!((requests[0].low, requests[0].high), (1, 3));
        log.set_fetched(vec![entry(1, 1, 1), entry(2, 1, 1)]);
        let got = log
            .entries(1, 3, None, GetEntriesContext::empty(true))
            .unwrap();
        assert_eq!(got.len(), 2);
        // A sync caller below the cache gets an error, never a wrong answer.
        assert!(log
            .entries(1, 3, None, GetEntriesContext::empty(false))
            .is_err());
    }

    #[test]
    #[should_panic(expected = "at or below the commit index")]
    fn truncating_committed_entries_is_refused() {
        let mut log = empty();
        log.append(&[entry(1, 1, 1), entry(2, 1, 1)]);
        let mut hard_state = log.hard_state().clone();
        hard_state.commit = 2;
        log.set_hard_state(hard_state);
        log.append(&[entry(2, 2, 1)]);
    }
}
