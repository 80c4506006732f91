//! Replicated logs in the WAL: Raft entries with their indexes and terms, durable
//! truncation, hard state, reads bounded by the commit point, and segments that
//! tell their frames' indexes on their own.

#![allow(clippy::unwrap_used)]

mod common;

use bytes::{Bytes, BytesMut};
use common::*;
use sluice_broker::storage::{format, Anchor, Control, EntryFrame, HardState, LogWrite, Wal};
use sluice_broker::types::{Epoch, LogId};

const LOG: LogId = LogId(3);

/// A data entry: a batch of `records` stamped at `offset` with `term`.
fn data_entry(
    index: u64,
    term: u64,
    offset: u64,
    records: usize,
    value_bytes: usize,
) -> EntryFrame {
    let frame = batch(records, value_bytes, index * 31 + term);
    let mut stamped = BytesMut::from(&frame[..]);
    format::stamp(&mut stamped, offset, LOG, Epoch(term as u32));
    let header = format::header(&stamped).unwrap();
    let max_timestamp_ms = header.max_timestamp_ms.get();
    EntryFrame {
        index,
        term,
        base_offset: offset,
        end_offset: offset + records as u64,
        max_timestamp_ms,
        frame: stamped.freeze(),
    }
}

/// A leader's no-op entry at `offset`.
fn noop_entry(index: u64, term: u64, offset: u64) -> EntryFrame {
    let control = Control::Entry {
        entry_type: 0,
        data: Bytes::new(),
        context: Bytes::new(),
    };
    EntryFrame {
        index,
        term,
        base_offset: offset,
        end_offset: offset,
        max_timestamp_ms: 0,
        frame: control.encode(LOG, offset, Epoch(term as u32), 0),
    }
}

fn state(term: u64, commit: u64, next_index: u64, next_offset: u64, commit_offset: u64) -> Control {
    Control::State {
        hard_state: HardState {
            term,
            vote: 1,
            commit,
        },
        anchor: Anchor {
            next_index,
            next_offset,
            prev_term: term,
            commit_offset,
        },
    }
}

async fn write(wal: &Wal, write: LogWrite) {
    wal.submit(LOG, write).unwrap().wait().await.unwrap();
}

#[test]
fn entries_truncation_and_hard_state_survive_a_crash() {
    let dir = scratch("replicated-crash");
    let config = config(&dir, 1 << 20);
    let again = config.clone();
    run(move || async move {
        let (wal, _) = Wal::open(config).await.unwrap();
        wal.create_replicated_log(LOG);
        // Term 1: a no-op, then entries 2..=5 with 10 records each.
        let mut frames = vec![noop_entry(1, 1, 0)];
        for index in 2..=5 {
            frames.push(data_entry(index, 1, (index - 2) * 10, 10, 100));
        }
        write(
            &wal,
            LogWrite {
                truncate: None,
                frames,
                state: Some(state(1, 3, 6, 40, 20)),
            },
        )
        .await;
        wal.set_commit(LOG, 3, 20);
        let read = wal.read(LOG, 0, 1 << 20).await.unwrap();
        assert_eq!(read.high_watermark, 20, "reads stop at the commit point");
        assert_eq!(read.frames.len(), 2, "the no-op is never served");
        // A read between the commit point and the log end waits; past it is out of range.
        assert!(wal.read(LOG, 30, 1 << 20).await.unwrap().frames.is_empty());
        assert!(wal.read(LOG, 41, 1 << 20).await.is_err());
        // Term 2 replaces entries 4 and 5 (never committed).
        write(
            &wal,
            LogWrite {
                truncate: Some(Control::Truncate {
                    index: 4,
                    offset: 20,
                    reset: false,
                    prev_term: 0,
                }),
                frames: vec![data_entry(4, 2, 20, 5, 100), noop_entry(5, 2, 25)],
                state: Some(state(2, 5, 6, 25, 25)),
            },
        )
        .await;
        // Truncating committed entries is refused.
        let refused = wal.submit(
            LOG,
            LogWrite {
                truncate: Some(Control::Truncate {
                    index: 2,
                    offset: 0,
                    reset: false,
                    prev_term: 0,
                }),
                ..LogWrite::default()
            },
        );
        assert!(refused.is_err());
        // No close: the next open recovers as after a crash.
    });
    run(move || async move {
        let (wal, report) = Wal::open(again).await.unwrap();
        assert!(!report.clean_shutdown);
        let view = wal.replicated_view(LOG).unwrap();
        assert_eq!(view.first_index, 1);
        assert_eq!(view.end_index, 6);
        assert_eq!(view.next_offset, 25);
        assert_eq!(view.hard_state.term, 2);
        assert_eq!(view.hard_state.commit, 5);
        assert_eq!(view.commit_offset, 25);
        assert_eq!(view.terms, vec![(1, 1), (4, 2)]);
        let entries = wal.read_entries(LOG, 1, 6, 1 << 20).await.unwrap();
        let indexes: Vec<u64> = entries.iter().map(|(i, _)| *i).collect();
        assert_eq!(indexes, [1, 2, 3, 4, 5]);
        let epochs: Vec<u32> = entries
            .iter()
            .map(|(_, f)| format::header(f).unwrap().leader_epoch.get())
            .collect();
        assert_eq!(
            epochs,
            [1, 1, 1, 2, 2],
            "the truncated term-1 entries are gone"
        );
        let read = wal.read(LOG, 0, 1 << 20).await.unwrap();
        assert_eq!(read.high_watermark, 25);
        let offsets: Vec<u64> = read
            .frames
            .iter()
            .map(|f| format::header(f).unwrap().base_offset.get())
            .collect();
        assert_eq!(offsets, [0, 10, 20]);
        wal.close().await;
    });
}

#[test]
fn every_segment_tells_its_frames_indexes_without_a_checkpoint() {
    let dir = scratch("replicated-anchors");
    let config = config(&dir, 1 << 20);
    let again = config.clone();
    let wal_dir = config.dir.clone();
    run(move || async move {
        let (wal, _) = Wal::open(config).await.unwrap();
        wal.create_replicated_log(LOG);
        let mut offset = 0;
        for index in 1..=60u64 {
            let entry = data_entry(index, 1, offset, 4, 16 * 1024);
            offset = entry.end_offset;
            write(
                &wal,
                LogWrite {
                    truncate: None,
                    frames: vec![entry],
                    state: Some(state(1, index, index + 1, offset, offset)),
                },
            )
            .await;
            wal.set_commit(LOG, index, offset);
        }
        assert!(wal.segment_ids().len() >= 3, "the test must roll segments");
        wal.close().await;
    });
    // Retention without a checkpoint: the oldest segment and the checkpoint go.
    let mut segments: Vec<_> = std::fs::read_dir(&wal_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    segments.sort();
    std::fs::remove_file(&segments[0]).unwrap();
    let _ = std::fs::remove_file(wal_dir.join("checkpoint"));
    run(move || async move {
        let (wal, _) = Wal::open(again).await.unwrap();
        let view = wal.replicated_view(LOG).unwrap();
        assert!(view.first_index > 1, "the first segment's entries are gone");
        assert_eq!(view.end_index, 61);
        assert_eq!(view.hard_state.commit, 60);
        let entries = wal
            .read_entries(LOG, view.first_index, 61, 64 << 20)
            .await
            .unwrap();
        assert_eq!(entries.len() as u64, 61 - view.first_index);
        for (index, frame) in &entries {
            let header = format::header(frame).unwrap();
            assert_eq!(
                header.base_offset.get(),
                (index - 1) * 4,
                "entry {index} is where its offsets say"
            );
        }
        wal.close().await;
    });
}
