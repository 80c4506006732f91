//! Shared helpers for the storage tests: a real-filesystem scratch directory and a
//! glommio executor to run a test body on.

#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::path::PathBuf;

use bytes::Bytes;
use sluice_broker::storage::{format, testkit, Appended, Wal, WalConfig};
use sluice_broker::types::{Epoch, LogId, ShardId};

/// A fresh directory under the target dir (a real filesystem, not tmpfs).
pub fn scratch(name: &str) -> PathBuf {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("storage-tests");
    let dir = base.join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `body` on a fresh single glommio executor.
pub fn run<F, Fut, T>(body: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .spawn(move || async move { body().await })
        .unwrap()
        .join()
        .unwrap()
}

/// A config with small segments.
pub fn config(dir: &std::path::Path, segment_bytes: u64) -> WalConfig {
    WalConfig {
        dir: dir.join("wal"),
        shard: ShardId(0),
        segment_bytes,
        tail_cache_bytes: 1 << 20,
    }
}

/// A batch of `records` records whose values are `value_bytes` long, derived from `seed`.
pub fn batch(records: usize, value_bytes: usize, seed: u64) -> Bytes {
    Bytes::from(testkit::batch_of_size(
        1_700_000_000_000 + seed as i64,
        records,
        value_bytes,
        seed,
    ))
}

/// Appends one batch.
pub async fn append(wal: &Wal, log: u32, frame: &Bytes) -> Appended {
    let info = format::verify_client_batch(frame, usize::MAX).unwrap();
    wal.append(LogId(log), Epoch(0), &[(frame.clone(), info)])
        .await
        .unwrap()
}

/// Reads every batch of a log from `from`, following offsets to the high watermark.
pub async fn read_all(wal: &Wal, log: u32, from: u64) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut offset = from;
    loop {
        let read = wal.read(LogId(log), offset, 4 << 20).await.unwrap();
        if read.frames.is_empty() {
            return out;
        }
        for frame in read.frames {
            let header = format::header(&frame).unwrap();
            let last = header.base_offset.get() + u64::from(header.last_offset_delta.get());
            if last >= offset {
                offset = last + 1;
                out.push(frame);
            }
        }
    }
}

/// The client-owned bytes of a stored frame (everything but the broker-stamped fields).
pub fn client_bytes(frame: &[u8]) -> Vec<u8> {
    let mut copy = frame.to_vec();
    copy[4..24].fill(0);
    copy
}
