//! Recovery rules beyond the torn tail: damage with intact frames after it, unsynced
//! tails, verification of the checkpointed index, index memory and disk use of an
//! empty WAL.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use sluice_broker::storage::checkpoint::Snapshot;
use sluice_broker::storage::format::{self, SegmentHeader};
use sluice_broker::storage::inspect;
use sluice_broker::storage::scan::{scan_in_memory, ScanEnd, ScanMode};
use sluice_broker::storage::{StorageError, Wal};
use sluice_broker::types::{Epoch, LogId, SegmentId, ShardId};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use zerocopy::IntoBytes;

/// Appends `count` batches of about `value_bytes` to log 1 and closes without a
/// checkpoint (as after a crash); returns the frames sent and the segment paths.
fn write(
    dir: &Path,
    segment_bytes: u64,
    count: u64,
    value_bytes: usize,
) -> (Vec<bytes::Bytes>, Vec<PathBuf>) {
    let config = config(dir, segment_bytes);
    let wal_dir = config.dir.clone();
    let frames = run(move || async move {
        let (wal, _) = Wal::open(config).await.unwrap();
        wal.create_log(LogId(1));
        let mut frames = Vec::new();
        for i in 0..count {
            let frame = batch(1, value_bytes, i);
            append(&wal, 1, &frame).await;
            frames.push(frame);
        }
        wal.close().await;
        frames
    });
    let _ = std::fs::remove_file(wal_dir.join("checkpoint"));
    (frames, segments(&wal_dir))
}

fn segments(wal_dir: &Path) -> Vec<PathBuf> {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(wal_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    segments.sort();
    segments
}

fn frames_of(path: &Path) -> Vec<inspect::FrameSummary> {
    inspect::inspect_segment(path, true).unwrap().frame_list
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.seek(SeekFrom::Start(at)).unwrap();
    file.write_all(bytes).unwrap();
    file.sync_all().unwrap();
}

fn open_and_read(
    dir: &Path,
    segment_bytes: u64,
) -> Result<(Vec<bytes::Bytes>, sluice_broker::storage::RecoveryReport), StorageError> {
    let config = config(dir, segment_bytes);
    run(move || async move {
        let (wal, report) = Wal::open(config).await?;
        let frames = read_all(&wal, 1, 0).await;
        wal.close().await;
        Ok((frames, report))
    })
}

#[test]
fn a_tail_written_but_never_synced_is_made_durable_before_it_is_served() {
    let dir = scratch("unsynced-tail");
    let (sent, segments) = write(&dir, 8 << 20, 20, 3000);
    let tail = segments.last().unwrap();
    let end = inspect::inspect_segment(tail, false).unwrap().end;
    // Frames that a write put on disk but no fdatasync covered: valid, continuing
    // the log, never acknowledged.
    let mut extra = Vec::new();
    for i in 0..5u64 {
        let mut frame = batch(1, 500, 100 + i).to_vec();
        format::stamp(&mut frame, 20 + i, LogId(1), Epoch(0));
        extra.extend_from_slice(&frame);
    }
    patch(tail, end, &extra);
    let (got, report) = open_and_read(&dir, 8 << 20).unwrap();
    assert_eq!(got.len(), sent.len() + 5, "{report:?}");
    assert!(
        report.tail_synced,
        "recovery syncs the tail it serves: {report:?}"
    );
    // After a clean shutdown nothing can be unsynced: no sync at open.
    let config = config(&dir, 8 << 20);
    run(move || async move {
        let (wal, _) = Wal::open(config.clone()).await.unwrap();
        wal.close().await;
        wal.checkpoint().await.unwrap();
        let (wal, report) = Wal::open(config).await.unwrap();
        assert!(report.clean_shutdown && !report.tail_synced, "{report:?}");
        wal.close().await;
    });
}

#[test]
fn header_damage_with_intact_frames_beyond_the_crash_window_refuses_to_open() {
    let dir = scratch("header-damage-tail");
    // 100 MiB of acknowledged 64 KiB batches in one tail segment: more intact
    // frames follow the damage than a crash can leave unsynced (72 MiB).
    let segment_bytes = 256 << 20;
    let (sent, segments) = write(&dir, segment_bytes, 1600, 64 * 1024);
    let tail = segments
        .iter()
        .find(|p| !frames_of(p).is_empty())
        .unwrap()
        .clone();
    let frames = frames_of(&tail);
    let victim = frames[10].clone();
    let original = std::fs::read(&tail).unwrap()[victim.position as usize + 30];
    patch(&tail, victim.position + 30, &[original ^ 0xff]); // frame_bytes
    let error = open_and_read(&dir, segment_bytes).unwrap_err();
    match &error {
        StorageError::Corrupt {
            path,
            position,
            reason,
        } => {
            assert_eq!(path, &tail);
            assert_eq!(*position, victim.position);
            assert!(reason.contains("intact batch follows"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // Nothing was cut: repairing the byte gives every acknowledged batch back.
    patch(&tail, victim.position + 30, &[original]);
    let (got, _) = open_and_read(&dir, segment_bytes).unwrap();
    assert_eq!(got.len(), sent.len());
}

#[test]
fn a_torn_write_that_kept_its_later_sectors_is_cut_and_a_copy_kept() {
    let dir = scratch("torn-keeps-later");
    let (sent, segments) = write(&dir, 8 << 20, 40, 2000);
    let tail = segments
        .iter()
        .find(|p| !frames_of(p).is_empty())
        .unwrap()
        .clone();
    let frames = frames_of(&tail);
    let victim = frames[30].clone();
    // The write's first sectors never landed; its later frames did.
    patch(&tail, victim.position, &[0u8; 200]);
    let (got, report) = open_and_read(&dir, 8 << 20).unwrap();
    assert_eq!(got.len(), 30, "{report:?}");
    for (stored, frame) in got.iter().zip(&sent) {
        assert_eq!(client_bytes(stored), client_bytes(frame));
    }
    let (first, end, copy) = report.quarantined.clone().expect("intact frames reported");
    assert_eq!(first, frames[31].position);
    assert_eq!(
        end,
        frames
            .last()
            .map(|f| f.position + u64::from(f.bytes))
            .unwrap()
    );
    let kept = std::fs::read(&copy).unwrap();
    assert_eq!(kept.len() as u64, end - victim.position, "{copy:?}");
    // The cut region was zeroed: the next open finds a clean log.
    let (again, report) = open_and_read(&dir, 8 << 20).unwrap();
    assert_eq!(again.len(), 30);
    assert!(
        report.torn_tail.is_none() && report.quarantined.is_none(),
        "{report:?}"
    );
}

#[test]
fn a_damaged_batch_in_a_checkpointed_segment_is_caught_at_read_and_marks_the_log() {
    let dir = scratch("checkpoint-verify");
    let config = config(&dir, 1 << 20);
    let wal_dir = config.dir.clone();
    let for_write = config.clone();
    run(move || async move {
        let (wal, _) = Wal::open(for_write).await.unwrap();
        wal.create_log(LogId(1));
        for i in 0..400u64 {
            append(&wal, 1, &batch(1, 700 + (i as usize * 131) % 5000, i)).await;
        }
        wal.close().await;
        wal.checkpoint().await.unwrap();
    });
    let first = &segments(&wal_dir)[0];
    let victim = frames_of(first)[5].clone();
    let mut bytes = std::fs::read(first).unwrap();
    bytes[victim.position as usize + 100] ^= 0x10;
    std::fs::write(first, &bytes).unwrap();
    let victim_offset = victim.base_offset;
    run(move || async move {
        let (wal, report) = Wal::open(config).await.unwrap();
        assert!(
            report.checkpoint_used && report.frames_scanned == 0,
            "{report:?}"
        );
        assert!(wal.read(LogId(1), 0, 1024).await.is_ok());
        for _ in 0..2 {
            let error = wal.read(LogId(1), victim_offset, 1024).await.unwrap_err();
            assert!(matches!(error, StorageError::Corrupt { .. }), "{error:?}");
        }
        assert_eq!(wal.corrupt_from(LogId(1)), Some(victim_offset));
        // Appends to a corrupt log are refused; reads below the damage go on.
        let info = format::verify_client_batch(&batch(1, 10, 1), usize::MAX).unwrap();
        assert!(wal
            .append(LogId(1), Epoch(0), &[(batch(1, 10, 1), info)])
            .await
            .is_err());
        assert!(wal.read(LogId(1), victim_offset - 1, 1024).await.is_ok());
        wal.close().await;
    });
}

#[test]
fn a_checkpoint_that_does_not_match_its_segment_marks_the_log_corrupt_at_read() {
    let dir = scratch("checkpoint-mismatch");
    let config = config(&dir, 1 << 20);
    let wal_dir = config.dir.clone();
    let for_write = config.clone();
    run(move || async move {
        let (wal, _) = Wal::open(for_write).await.unwrap();
        wal.create_log(LogId(1));
        wal.create_log(LogId(2));
        for i in 0..300u64 {
            append(&wal, 1 + (i % 2) as u32, &batch(1, 3000, i)).await;
        }
        wal.close().await;
        wal.checkpoint().await.unwrap();
    });
    // Point log 1's first run at log 2's first batch.
    let mut snapshot = Snapshot::read(&wal_dir).unwrap().unwrap();
    let log2_first = snapshot.logs[&LogId(2)].runs[0].position;
    snapshot.logs.get_mut(&LogId(1)).unwrap().runs[0].position = log2_first;
    std::fs::write(wal_dir.join("checkpoint"), snapshot.encode()).unwrap();
    run(move || async move {
        let (wal, report) = Wal::open(config).await.unwrap();
        assert!(report.checkpoint_used, "{report:?}");
        let error = wal.read(LogId(1), 0, 1024).await.unwrap_err();
        assert!(error.to_string().contains("log 2"), "{error}");
        assert_eq!(wal.corrupt_from(LogId(1)), Some(0));
        // Log 2 is untouched.
        assert!(!read_all(&wal, 2, 0).await.is_empty());
        wal.close().await;
    });
}

#[test]
fn the_index_holds_one_entry_per_mebibyte_of_wal_per_log() {
    let dir = scratch("index-size");
    let config = config(&dir, 256 << 20);
    run(move || async move {
        let (wal, _) = Wal::open(config).await.unwrap();
        let logs = 4u32;
        for log in 0..logs {
            wal.create_log(LogId(log));
        }
        // 4096 appends of ~4 KiB, interleaved over 4 logs: 16 MiB of WAL.
        let appends = 4096u64;
        let mut wal_bytes = 0u64;
        for i in 0..appends {
            let frame = batch(1, 4000, i);
            wal_bytes += frame.len() as u64;
            append(&wal, (i % u64::from(logs)) as u32, &frame).await;
        }
        let index_bytes = wal.index_bytes() as u64;
        let entry = std::mem::size_of::<sluice_broker::storage::Run>() as u64;
        let entries = index_bytes / entry;
        let mib = wal_bytes.div_ceil(1 << 20);
        // One entry per MiB of WAL per log (+1 per log for the partial last MiB);
        // one per append before runs merged across writes.
        assert!(
            entries <= mib * u64::from(logs) + u64::from(logs),
            "{entries} entries for {mib} MiB"
        );
        println!(
            "index: {entries} entries ({index_bytes} bytes) for {appends} appends, {mib} MiB of WAL over {logs} logs: {} bytes of index per GiB of WAL",
            index_bytes * (1 << 30) / wal_bytes
        );
        // Reads still find every batch.
        for log in 0..logs {
            assert_eq!(
                read_all(&wal, log, 0).await.len() as u64,
                appends / u64::from(logs)
            );
        }
        wal.close().await;
    });
}

#[test]
fn an_empty_wal_zero_fills_its_segment_in_steps() {
    let dir = scratch("stepwise");
    let config = config(&dir, 1 << 30);
    let wal_dir = config.dir.clone();
    let disk = |dir: &Path| -> u64 {
        segments(dir)
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().blocks() * 512)
            .sum()
    };
    let for_run = config.clone();
    run(move || async move {
        let (wal, _) = Wal::open(for_run).await.unwrap();
        wal.close().await;
    });
    let empty = disk(&wal_dir);
    assert!(
        empty <= 128 << 20,
        "an empty 1 GiB-segment WAL holds {empty} bytes of disk"
    );
    // The segment grows ahead of the writer as data arrives.
    run(move || async move {
        let (wal, _) = Wal::open(config).await.unwrap();
        wal.create_log(LogId(1));
        for i in 0..600u64 {
            append(&wal, 1, &batch(1, 100_000, i)).await;
        }
        assert_eq!(read_all(&wal, 1, 0).await.len(), 600);
        wal.close().await;
    });
    // (A spare made at the first open became the active segment at the second.)
    let largest = segments(&wal_dir)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .max()
        .unwrap();
    assert!(largest >= 60 << 20, "{largest}");
    assert!(disk(&wal_dir) < 256 << 20);
}

/// A segment image in memory: header block, the frames, zeros to `size`.
fn image(frames: &[Vec<u8>], size: usize) -> (Vec<u8>, Vec<u64>) {
    let mut bytes = vec![0u8; 4096];
    let header = SegmentHeader::new(ShardId(0), SegmentId(1), size as u64, 0);
    bytes[..header.as_bytes().len()].copy_from_slice(header.as_bytes());
    let mut positions = Vec::new();
    for frame in frames {
        positions.push(bytes.len() as u64);
        bytes.extend_from_slice(frame);
    }
    bytes.resize(size.max(bytes.len()), 0);
    (bytes, positions)
}

fn stamped_frames(count: u64) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            let mut frame = batch(1, 1000, i).to_vec();
            format::stamp(&mut frame, i, LogId(7), Epoch(0));
            frame
        })
        .collect()
}

fn mode(may_be_torn: bool, window: u64) -> ScanMode {
    ScanMode {
        segment: SegmentId(1),
        start: 4096,
        may_be_torn,
        window,
    }
}

#[test]
fn scan_rules_torn_versus_corrupt() {
    let frames = stamped_frames(50);
    let (clean, positions) = image(&frames, 1 << 20);
    let end = positions[49] + frames[49].len() as u64;
    // Intact: clean end either way.
    for torn in [false, true] {
        let (result, logs, stats) = scan_in_memory(&clean, mode(torn, 1 << 16));
        assert_eq!(result.unwrap(), ScanEnd::Clean(end));
        assert_eq!(stats.frames, 50);
        assert_eq!(logs[&LogId(7)].next_offset, 50);
    }
    // Damage with nothing valid after it: torn in the tail, corrupt elsewhere.
    let mut damaged = clean.clone();
    damaged[positions[45] as usize..end as usize].fill(0xAB);
    let (result, _, _) = scan_in_memory(&damaged, mode(true, 1 << 16));
    assert!(
        matches!(result.unwrap(), ScanEnd::Torn { at, intact_after: None, .. } if at == positions[45])
    );
    assert!(matches!(
        scan_in_memory(&damaged, mode(false, 0)).0,
        Err(StorageError::Corrupt { .. })
    ));
    // A zeroed header inside the data, intact frames after it within the window:
    // a torn write (cut, intact frames reported); beyond the window: corruption.
    let mut holed = clean.clone();
    holed[positions[20] as usize..positions[20] as usize + 80].fill(0);
    match scan_in_memory(&holed, mode(true, 1 << 20)).0.unwrap() {
        ScanEnd::Torn {
            at, intact_after, ..
        } => {
            assert_eq!(at, positions[20]);
            assert_eq!(intact_after, Some((positions[21], end)));
        }
        other => panic!("{other:?}"),
    }
    for (torn, window) in [(true, 4096), (false, 0)] {
        match scan_in_memory(&holed, mode(torn, window)).0 {
            Err(StorageError::Corrupt {
                position, reason, ..
            }) => {
                assert_eq!(position, positions[20]);
                assert!(reason.contains("intact batch follows"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
    // A payload bit flip behind an intact header, beyond the window: only that
    // log is marked corrupt and the scan goes on.
    let mut flipped = clean.clone();
    flipped[positions[3] as usize + 200] ^= 1;
    let (result, _, stats) = scan_in_memory(&flipped, mode(true, 4096));
    assert_eq!(result.unwrap(), ScanEnd::Clean(end));
    assert_eq!(stats.corrupt_logs.len(), 1);
    assert_eq!(stats.corrupt_logs[0].1, 3);
    // A frame that skips offsets: corruption.
    let mut gap_frames = stamped_frames(10);
    format::stamp(&mut gap_frames[6], 99, LogId(7), Epoch(0));
    let (gapped, _) = image(&gap_frames, 1 << 20);
    assert!(matches!(
        scan_in_memory(&gapped, mode(true, 1 << 20)).0,
        Err(StorageError::Corrupt { .. })
    ));
}
