//! Appends, reads across segments, restart from a checkpoint, retention.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use sluice_broker::storage::{Retention, StorageError, Wal};
use sluice_broker::types::LogId;
use std::collections::HashMap;

#[test]
fn appends_read_back_identical_across_segments_and_logs() {
    let dir = scratch("roundtrip");
    let config = config(&dir, 1 << 20);
    run(move || async move {
        let (wal, report) = Wal::open(config).await.unwrap();
        assert_eq!(report.frames_scanned, 0);
        for log in 0..3 {
            wal.create_log(LogId(log));
        }
        let mut expected: HashMap<u32, Vec<bytes::Bytes>> = HashMap::new();
        let mut tasks = Vec::new();
        for log in 0..3u32 {
            let wal = wal.clone();
            tasks.push(glommio::spawn_local(async move {
                let mut frames = Vec::new();
                let mut next = 0;
                for i in 0..120u64 {
                    let records = 1 + (i % 4) as usize;
                    let frame = batch(
                        records,
                        50 + (i as usize * 97) % 9000,
                        i * 10 + u64::from(log),
                    );
                    let appended = append(&wal, log, &frame).await;
                    assert_eq!(
                        appended.base_offset, next,
                        "offsets are consecutive per log"
                    );
                    next = appended.last_offset + 1;
                    frames.push(frame);
                }
                (log, frames)
            }));
        }
        for task in tasks {
            let (log, frames) = task.await;
            expected.insert(log, frames);
        }
        assert!(
            wal.segment_ids().len() > 1,
            "the test must cross segment boundaries"
        );
        for (log, frames) in &expected {
            let got = read_all(&wal, *log, 0).await;
            assert_eq!(got.len(), frames.len());
            for (stored, sent) in got.iter().zip(frames) {
                assert_eq!(
                    client_bytes(stored),
                    client_bytes(sent),
                    "bytes returned are the bytes appended"
                );
            }
        }
        // Reads from the middle of a batch return the batch containing the offset.
        let read = wal.read(LogId(0), 1, 1).await.unwrap();
        assert_eq!(read.frames.len(), 1);
        wal.close().await;
    });
}

#[test]
fn restart_after_clean_close_uses_checkpoint_and_keeps_everything() {
    let dir = scratch("restart");
    let config = config(&dir, 1 << 20);
    let second = config.clone();
    let sent = run(move || async move {
        let (wal, _) = Wal::open(config).await.unwrap();
        wal.create_log(LogId(7));
        let mut sent = Vec::new();
        for i in 0..200u64 {
            let frame = batch(3, 3000, i);
            append(&wal, 7, &frame).await;
            sent.push(frame);
        }
        wal.close().await;
        wal.checkpoint().await.unwrap();
        sent
    });
    run(move || async move {
        let (wal, report) = Wal::open(second).await.unwrap();
        assert!(report.checkpoint_used, "{report:?}");
        assert_eq!(
            report.frames_scanned, 0,
            "a clean restart rescans nothing: {report:?}"
        );
        let got = read_all(&wal, 7, 0).await;
        assert_eq!(got.len(), sent.len());
        for (stored, frame) in got.iter().zip(&sent) {
            assert_eq!(client_bytes(stored), client_bytes(frame));
        }
        let (start, high_watermark, _) = wal.log_offsets(LogId(7)).unwrap();
        assert_eq!((start, high_watermark), (0, 600));
        // Appends continue the offsets.
        let appended = append(&wal, 7, &batch(1, 10, 999)).await;
        assert_eq!(appended.base_offset, 600);
        wal.close().await;
    });
}

#[test]
fn restart_without_checkpoint_rescans() {
    let dir = scratch("rescan");
    let config = config(&dir, 1 << 20);
    let second = config.clone();
    let wal_dir = config.dir.clone();
    run(move || async move {
        let (wal, _) = Wal::open(config).await.unwrap();
        wal.create_log(LogId(1));
        for i in 0..100u64 {
            append(&wal, 1, &batch(2, 5000, i)).await;
        }
        wal.close().await;
    });
    let _ = std::fs::remove_file(wal_dir.join("checkpoint"));
    run(move || async move {
        let (wal, report) = Wal::open(second).await.unwrap();
        assert!(!report.checkpoint_used);
        assert_eq!(report.frames_scanned, 100);
        assert_eq!(wal.log_offsets(LogId(1)).unwrap().1, 200);
        assert_eq!(read_all(&wal, 1, 0).await.len(), 100);
        wal.close().await;
    });
}

#[test]
fn out_of_range_reads_carry_the_valid_range() {
    let dir = scratch("range");
    let config = config(&dir, 1 << 20);
    run(move || async move {
        let (wal, _) = Wal::open(config).await.unwrap();
        wal.create_log(LogId(1));
        append(&wal, 1, &batch(5, 10, 1)).await;
        let error = wal.read(LogId(1), 6, 1000).await.unwrap_err();
        assert!(
            matches!(
                error,
                StorageError::OffsetOutOfRange {
                    offset: 6,
                    log_start: 0,
                    high_watermark: 5
                }
            ),
            "{error:?}"
        );
        // Reading at the high watermark is not an error: there is just nothing yet.
        assert!(wal.read(LogId(1), 5, 1000).await.unwrap().frames.is_empty());
        assert!(matches!(
            wal.read(LogId(9), 0, 10).await.unwrap_err(),
            StorageError::UnknownLog(_)
        ));
        wal.close().await;
    });
}

#[test]
fn a_read_below_an_upper_offset_stops_there_and_answers_it() {
    let dir = scratch("read-below");
    let config = config(&dir, 1 << 20);
    run(move || async move {
        let (wal, _) = Wal::open(config).await.unwrap();
        wal.create_log(LogId(1));
        for i in 0..4u64 {
            append(&wal, 1, &batch(5, 10, i)).await;
        }
        // Four batches of 5 records; the partition layer answers with 10.
        let read = wal.read_below(LogId(1), 0, 1 << 20, 10).await.unwrap();
        assert_eq!(read.high_watermark, 10);
        assert_eq!(read.frames.len(), 2, "only the batches below offset 10");
        // At or past the upper bound (but within the log): nothing, no error.
        let read = wal.read_below(LogId(1), 10, 1 << 20, 10).await.unwrap();
        assert!(read.frames.is_empty());
        assert_eq!(read.high_watermark, 10);
        // An upper bound past the log's own high watermark changes nothing.
        let read = wal.read_below(LogId(1), 0, 1 << 20, 1_000).await.unwrap();
        assert_eq!((read.high_watermark, read.frames.len()), (20, 4));
        wal.close().await;
    });
}

#[test]
fn retention_by_size_and_time_deletes_the_right_segments() {
    let dir = scratch("retention");
    let config = config(&dir, 1 << 20);
    run(move || async move {
        let (wal, _) = Wal::open(config).await.unwrap();
        wal.create_log(LogId(1));
        wal.create_log(LogId(2));
        // Log 1 fills several segments; log 2 writes one batch at the start and keeps
        // the first segment alive until its own retention lets it go.
        append(&wal, 2, &batch(1, 100, 0)).await;
        for i in 0..400u64 {
            append(&wal, 1, &batch(1, 10_000, i)).await;
        }
        let before = wal.segment_ids();
        assert!(before.len() >= 3, "{before:?}");
        let mut policies = HashMap::new();
        policies.insert(
            LogId(1),
            Retention {
                retention_ms: None,
                retention_bytes: Some(512 << 10),
            },
        );
        policies.insert(LogId(2), Retention::default());
        let now = 1_700_000_000_000 + 1_000_000;
        wal.apply_retention(&policies, now);
        let (start, high_watermark, stored) = wal.log_offsets(LogId(1)).unwrap();
        assert!(
            start > 0 && stored <= 512 << 10,
            "log start moved to keep at most 512 KiB: {start} {stored}"
        );
        assert_eq!(high_watermark, 400);
        let error = wal.read(LogId(1), 0, 100).await.unwrap_err();
        assert!(
            matches!(error, StorageError::OffsetOutOfRange { log_start, .. } if log_start == start)
        );
        let deleted = wal.delete_dead_segments().await.unwrap();
        assert!(
            !deleted.contains(&before[0]),
            "segment 1 still holds log 2's live batch"
        );
        assert!(
            !deleted.is_empty(),
            "segments holding only expired log-1 batches are deleted"
        );
        // Time-based retention for log 2 frees the first segment.
        policies.insert(
            LogId(2),
            Retention {
                retention_ms: Some(1000),
                retention_bytes: None,
            },
        );
        wal.apply_retention(&policies, now);
        let deleted = wal.delete_dead_segments().await.unwrap();
        assert!(deleted.contains(&before[0]), "{deleted:?}");
        for id in wal.segment_ids() {
            assert!(!deleted.contains(&id));
        }
        // Everything still live reads back.
        let got = read_all(&wal, 1, start).await;
        assert_eq!(got.len() as u64, 400 - start);
        wal.close().await;
    });
}

#[test]
fn many_concurrent_appenders_share_fsyncs() {
    let dir = scratch("group");
    let config = config(&dir, 64 << 20);
    run(move || async move {
        let (wal, _) = Wal::open(config).await.unwrap();
        let mut tasks = Vec::new();
        for log in 0..64u32 {
            wal.create_log(LogId(log));
            let wal = wal.clone();
            tasks.push(glommio::spawn_local(async move {
                for i in 0..20u64 {
                    append(&wal, log, &batch(1, 1000, i)).await;
                }
            }));
        }
        for task in tasks {
            task.await;
        }
        let stats = wal.stats();
        assert_eq!(stats.appends, 64 * 20);
        assert!(
            stats.syncs < stats.appends / 4,
            "group commit coalesces fsyncs: {stats:?}"
        );
        wal.close().await;
    });
}

#[test]
fn a_log_segment_limit_rolls_the_wal() {
    let dir = scratch("segment-limit");
    let config = config(&dir, 16 << 20);
    run(move || async move {
        let (wal, _) = Wal::open(config).await.unwrap();
        wal.create_log(LogId(1));
        wal.set_segment_limit(LogId(1), 1 << 20);
        for i in 0..300u64 {
            append(&wal, 1, &batch(1, 10_000, i)).await;
        }
        // ~3 MiB of log 1 with at most 1 MiB per segment: at least 3 segments hold
        // it, although each segment could hold 16 MiB.
        let segments: std::collections::HashSet<_> = wal.segment_ids().into_iter().collect();
        assert!(segments.len() >= 3, "{segments:?}");
        assert_eq!(read_all(&wal, 1, 0).await.len(), 300);
        wal.close().await;
    });
}

/// A frame of exactly `bytes` bytes.
fn frame_of(bytes: usize, seed: u64) -> bytes::Bytes {
    let mut value = bytes - 100;
    loop {
        let frame = batch(1, value, seed);
        match frame.len().cmp(&bytes) {
            std::cmp::Ordering::Equal => return frame,
            std::cmp::Ordering::Less => value += 1,
            std::cmp::Ordering::Greater => value -= 1,
        }
    }
}

#[test]
fn writes_ending_exactly_on_block_and_chunk_boundaries() {
    let dir = scratch("boundaries");
    let config = config(&dir, 16 << 20);
    run(move || async move {
        let (wal, _) = Wal::open(config).await.unwrap();
        wal.create_log(LogId(1));
        // A fresh segment's frames start at byte 4096: a 1 MiB frame ends exactly on
        // a 1 MiB write-chunk boundary, a 4096-byte frame on a block boundary.
        let frames = vec![
            frame_of(1 << 20, 1),
            frame_of(4096, 2),
            frame_of(2 << 20, 3),
            batch(1, 10, 4),
        ];
        for frame in &frames {
            append(&wal, 1, frame).await;
        }
        let got = read_all(&wal, 1, 0).await;
        assert_eq!(got.len(), frames.len());
        for (stored, sent) in got.iter().zip(&frames) {
            assert_eq!(client_bytes(stored), client_bytes(sent));
        }
        wal.close().await;
    });
}

#[test]
fn large_writes_get_allocated_steps_small_ones_zero_filled_and_both_read_back_after_a_rescan() {
    let dir = scratch("allocated-steps");
    let config = config(&dir, 256 << 20);
    let second = config.clone();
    let wal_dir = config.dir.clone();
    let sent = run(move || async move {
        let (wal, _) = Wal::open(config).await.unwrap();
        wal.create_log(LogId(1));
        let mut sent = Vec::new();
        // Small writes first: their steps are zero-filled.
        for i in 0..6_000u64 {
            let frame = batch(4, 1000, i);
            append(&wal, 1, &frame).await;
            sent.push(frame);
        }
        let small = wal.stats();
        assert!(small.steps_zero_filled >= 1, "{small:?}");
        assert_eq!(small.steps_allocated, 0, "{small:?}");
        // Then ~1 MiB writes: once the average moves, steps are allocated.
        for i in 0..120u64 {
            let frame = batch(64, 16_000, 10_000 + i);
            append(&wal, 1, &frame).await;
            sent.push(frame);
        }
        let large = wal.stats();
        assert!(large.steps_allocated >= 2, "{large:?}");
        wal.close().await;
        sent
    });
    // Without the checkpoint the whole segment is scanned: the allocated steps
    // read as zeros past the last frame, like zero-filled ones.
    let _ = std::fs::remove_file(wal_dir.join("checkpoint"));
    run(move || async move {
        let (wal, report) = Wal::open(second).await.unwrap();
        assert!(!report.checkpoint_used);
        assert_eq!(report.frames_scanned, sent.len() as u64);
        let got = read_all(&wal, 1, 0).await;
        assert_eq!(got.len(), sent.len());
        for (stored, frame) in got.iter().zip(&sent) {
            assert_eq!(client_bytes(stored), client_bytes(frame));
        }
        // Appends continue after the rescan.
        append(&wal, 1, &batch(64, 16_000, 99_999)).await;
        wal.close().await;
    });
}
