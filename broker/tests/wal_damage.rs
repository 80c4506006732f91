//! Torn tails, garbage tails and bit flips: recovery cuts what was never
//! acknowledged and reports corruption anywhere else.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use sluice_broker::storage::{StorageError, Wal};
use sluice_broker::types::LogId;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Writes `count` batches to log 1 and closes without a checkpoint; returns the
/// frames and the segment files.
fn write_batches(dir: &Path, count: u64, segment_bytes: u64) -> (Vec<bytes::Bytes>, Vec<PathBuf>) {
    let config = config(dir, segment_bytes);
    let wal_dir = config.dir.clone();
    let frames = run(move || async move {
        let (wal, _) = Wal::open(config).await.unwrap();
        wal.create_log(LogId(1));
        let mut frames = Vec::new();
        for i in 0..count {
            let frame = batch(1 + (i % 3) as usize, 700 + (i as usize * 131) % 5000, i);
            append(&wal, 1, &frame).await;
            frames.push(frame);
        }
        wal.close().await;
        frames
    });
    let _ = std::fs::remove_file(wal_dir.join("checkpoint"));
    let mut segments: Vec<PathBuf> = std::fs::read_dir(&wal_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    segments.sort();
    (frames, segments)
}

/// The newest segment holding frames (a zero-filled spare may follow it).
fn last_with_frames(segments: &[PathBuf]) -> (usize, &PathBuf) {
    segments
        .iter()
        .enumerate()
        .rev()
        .find(|(_, p)| {
            sluice_broker::storage::inspect::inspect_segment(p, false)
                .unwrap()
                .frames
                > 0
        })
        .unwrap()
}

/// Position where valid frames end in a segment (by inspection).
fn frames_end(path: &Path) -> u64 {
    sluice_broker::storage::inspect::inspect_segment(path, false)
        .unwrap()
        .end
}

fn reopen_and_read(
    dir: &Path,
    segment_bytes: u64,
) -> Result<(Vec<bytes::Bytes>, sluice_broker::storage::RecoveryReport), StorageError> {
    let config = config(dir, segment_bytes);
    run(move || async move {
        let (wal, report) = Wal::open(config).await?;
        let frames = read_all(&wal, 1, 0).await;
        // The log keeps working after recovery.
        let appended = append(&wal, 1, &batch(1, 10, 4242)).await;
        let last = frames.last().map(|f| {
            let h = sluice_broker::storage::format::header(f).unwrap();
            h.base_offset.get() + u64::from(h.last_offset_delta.get()) + 1
        });
        assert_eq!(appended.base_offset, last.unwrap_or(0));
        wal.close().await;
        Ok((frames, report))
    })
}

fn assert_prefix(got: &[bytes::Bytes], sent: &[bytes::Bytes]) {
    assert!(got.len() <= sent.len());
    for (stored, frame) in got.iter().zip(sent) {
        assert_eq!(client_bytes(stored), client_bytes(frame));
    }
}

#[test]
fn truncating_the_last_segment_at_random_bytes_cuts_only_the_tail() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_0001);
    for round in 0..5 {
        let dir = scratch(&format!("truncate-{round}"));
        let (sent, segments) = write_batches(&dir, 60, 1 << 20);
        let (index, last) = last_with_frames(&segments);
        let end = frames_end(last);
        let cut = rng.gen_range(4096..end);
        // Simulate a crash that lost everything after `cut`: zero from there on (the
        // file keeps its pre-allocated size, as on a real crash).
        let mut file = std::fs::OpenOptions::new().write(true).open(last).unwrap();
        file.seek(SeekFrom::Start(cut)).unwrap();
        file.write_all(&vec![0u8; (end - cut) as usize]).unwrap();
        drop(file);
        let (got, report) = reopen_and_read(&dir, 1 << 20).unwrap();
        assert_prefix(&got, &sent);
        assert!(
            got.len() < sent.len(),
            "round {round}: cut at {cut} of {end} loses the tail"
        );
        // Everything in older segments survives.
        let older: u64 = segments[..index]
            .iter()
            .map(|p| {
                sluice_broker::storage::inspect::inspect_segment(p, false)
                    .unwrap()
                    .frames
            })
            .sum();
        assert!(got.len() as u64 >= older, "{report:?}");
    }
}

#[test]
fn garbage_over_the_tail_is_cut_and_zeroed() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_0002);
    for round in 0..5 {
        let dir = scratch(&format!("garbage-{round}"));
        let (sent, segments) = write_batches(&dir, 40, 1 << 20);
        let (_, last) = last_with_frames(&segments);
        let end = frames_end(last);
        let from = rng.gen_range(4096..end);
        let garbage: Vec<u8> = (0..(end - from + 3000)).map(|_| rng.gen()).collect();
        let mut file = std::fs::OpenOptions::new().write(true).open(last).unwrap();
        file.seek(SeekFrom::Start(from)).unwrap();
        file.write_all(&garbage).unwrap();
        drop(file);
        let (got, report) = reopen_and_read(&dir, 1 << 20).unwrap();
        assert!(report.torn_tail.is_some(), "round {round}: {report:?}");
        assert_prefix(&got, &sent);
        // A second restart finds a clean log: the garbage was zeroed.
        let (again, report) = reopen_and_read(&dir, 1 << 20).unwrap();
        assert!(report.torn_tail.is_none(), "{report:?}");
        assert_eq!(again.len(), got.len() + 1);
    }
}

#[test]
fn a_bit_flip_in_an_older_batch_is_detected_and_reported() {
    let dir = scratch("bitflip");
    let (_, segments) = write_batches(&dir, 400, 1 << 20);
    assert!(segments.len() >= 2);
    let first = &segments[0];
    // Flip a bit inside the payload of the 5th frame of the first segment.
    let summary = sluice_broker::storage::inspect::inspect_segment(first, true).unwrap();
    let victim = summary.frame_list[4].clone();
    let at = victim.position + 100;
    let mut bytes = std::fs::read(first).unwrap();
    bytes[at as usize] ^= 0x10;
    std::fs::write(first, &bytes).unwrap();
    // The operator tool reports it.
    let inspected = sluice_broker::storage::inspect::inspect_segment(first, false).unwrap();
    let (position, reason) = inspected
        .bad_frames
        .first()
        .cloned()
        .expect("inspect reports the bad frame");
    assert_eq!(position, victim.position);
    assert!(reason.contains("CRC"), "{reason}");
    // Recovery marks the log corrupt from that batch: earlier batches are served,
    // nothing at or past it is.
    let config = config(&dir, 1 << 20);
    let victim_offset = victim.base_offset;
    run(move || async move {
        let (wal, report) = Wal::open(config).await.unwrap();
        assert_eq!(report.corrupt_logs.len(), 1, "{report:?}");
        assert_eq!(report.corrupt_logs[0].1, victim_offset);
        let before = wal.read(LogId(1), 0, 1 << 20).await.unwrap();
        assert!(!before.frames.is_empty());
        let error = wal
            .read(LogId(1), victim_offset, 1 << 20)
            .await
            .unwrap_err();
        match error {
            StorageError::Corrupt { path, position, .. } => {
                assert!(path.ends_with("0000000001.wal"), "{path:?}");
                assert_eq!(position, victim.position);
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        wal.close().await;
    });
}

#[test]
fn a_damaged_header_in_an_older_segment_refuses_to_open_with_file_and_position() {
    let dir = scratch("header-damage");
    let (_, segments) = write_batches(&dir, 400, 1 << 20);
    let first = &segments[0];
    let summary = sluice_broker::storage::inspect::inspect_segment(first, true).unwrap();
    let victim = &summary.frame_list[3];
    let mut bytes = std::fs::read(first).unwrap();
    bytes[victim.position as usize + 30] ^= 0xff; // frame_bytes field
    std::fs::write(first, &bytes).unwrap();
    let config = config(&dir, 1 << 20);
    let error = run(move || async move { Wal::open(config).await.map(|_| ()).unwrap_err() });
    match &error {
        StorageError::Corrupt { path, position, .. } => {
            assert!(path.ends_with("0000000001.wal"));
            assert_eq!(*position, victim.position);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(error.to_string().contains("0000000001.wal"), "{error}");
}

#[test]
fn a_data_dir_from_another_format_version_or_shard_is_refused() {
    let dir = scratch("incompatible");
    let (_, segments) = write_batches(&dir, 3, 1 << 20);
    // Another shard's WAL.
    let mut other = config(&dir, 1 << 20);
    other.shard = sluice_broker::types::ShardId(3);
    let error = run(move || async move { Wal::open(other).await.map(|_| ()).unwrap_err() });
    assert!(
        matches!(error, StorageError::Incompatible { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("shard"), "{error}");
    // A different format version in the segment header.
    let mut bytes = std::fs::read(&segments[0]).unwrap();
    bytes[8] = 99; // format_version (CRC now mismatches too; either way refused)
    std::fs::write(&segments[0], &bytes).unwrap();
    let config = config(&dir, 1 << 20);
    let error = run(move || async move { Wal::open(config).await.map(|_| ()).unwrap_err() });
    assert!(error.to_string().contains("0000000001.wal"), "{error}");
}
