//! Segment lifecycle: rolling, the spare segment prepared ahead of need, and the
//! extender that prepares the active segment step by step ahead of the writer
//! (zero-filled for small writes, allocated with fallocate for large ones).

use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use super::error::{Result, StorageError};
use super::segment::{Extend, SegmentFile};
use super::wal::{now_ms, Segment, Wal};
use crate::limits::{SEGMENT_ALLOCATE_WRITE_BYTES, SEGMENT_HEADER_BYTES, SEGMENT_ZERO_AHEAD_BYTES};
use crate::types::SegmentId;

/// After a failed step (a full disk), the extender tries again this much later.
const EXTEND_RETRY: Duration = Duration::from_millis(100);

/// Keeps the active segment prepared `SEGMENT_ZERO_AHEAD_BYTES` beyond what is
/// written and queued, one durable step at a time (zero-filled, or allocated
/// while writes average `SEGMENT_ALLOCATE_WRITE_BYTES` or more), and gives
/// rolled-over segments their unused tail back. Runs until the WAL closes.
pub(super) async fn extender_loop(wal: Rc<Wal>) {
    let mut shrunk_below = wal.state.borrow().active;
    loop {
        let wake = wal.extender_wake.wait();
        let (file, want, active, large_writes) = {
            let state = wal.state.borrow();
            if state.closing && state.writer_done {
                break;
            }
            let active = state.active;
            let file = state.segments[&active].file.clone();
            let want = (state.write_byte + state.inflight_bytes as u64 + SEGMENT_ZERO_AHEAD_BYTES)
                .min(file.capacity);
            let large_writes = state.write_bytes_average >= SEGMENT_ALLOCATE_WRITE_BYTES as f64;
            (file, want, active, large_writes)
        };
        if shrunk_below < active {
            shrink_rolled(&wal, shrunk_below, active).await;
            shrunk_below = active;
        }
        if file.zeroed_end() >= want {
            wake.await;
            continue;
        }
        let how = if large_writes {
            Extend::Allocate
        } else {
            Extend::ZeroFill
        };
        match file.extend(how).await {
            Ok(_) => {
                let mut state = wal.state.borrow_mut();
                state.extend_error = None;
                match how {
                    Extend::ZeroFill => state.stats.steps_zero_filled += 1,
                    Extend::Allocate => state.stats.steps_allocated += 1,
                }
            }
            Err(error) => {
                tracing::warn!(path = %file.path.display(), %error, "cannot extend the WAL segment (zero-fill or allocate); appends that need the space fail until it can");
                let mut state = wal.state.borrow_mut();
                if !matches!(error, StorageError::DiskFull { .. }) {
                    state.extend_error = Some(StorageError::Failed(error.to_string()));
                } else {
                    state.extend_error = Some(error);
                }
            }
        }
        wal.extended.notify_all();
        if wal.state.borrow().extend_error.is_some() {
            glommio::timer::sleep(EXTEND_RETRY).await;
        }
    }
    wal.extended.notify_all();
}

/// Shrinks segments in `[from, active)` to their last frame (they are durable and
/// never appended to again).
async fn shrink_rolled(wal: &Rc<Wal>, from: SegmentId, active: SegmentId) {
    let rolled: Vec<(Rc<SegmentFile>, u64)> = {
        let state = wal.state.borrow();
        state
            .segments
            .range(from..active)
            .map(|(_, segment)| (segment.file.clone(), segment.end))
            .collect()
    };
    for (file, end) in rolled {
        if let Err(error) = file.shrink_to(end).await {
            tracing::warn!(path = %file.path.display(), %error, "cannot give back the unused end of a WAL segment");
        }
    }
}

/// Switches appends to a new segment. Everything written to the old one is made
/// durable first, so a torn write can only ever be in the newest segment.
pub(super) async fn roll(wal: &Rc<Wal>) -> Result<()> {
    wal.drain().await?;
    let next_id = SegmentId(wal.state.borrow().active.0 + 1);
    while wal.set_preparing_spare(true) {
        // The background task is preparing the spare: wait for it to finish.
        glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
    }
    let spare = wal.take_spare().filter(|spare| spare.id == next_id);
    let created = match spare {
        Some(spare) => Ok(spare),
        None => {
            let config = wal.config();
            SegmentFile::create(
                &config.dir,
                config.shard,
                next_id,
                config.segment_bytes,
                now_ms(),
            )
            .await
        }
    };
    wal.set_preparing_spare(false);
    let segment = created?;
    {
        let mut state = wal.state.borrow_mut();
        state.segments.insert(
            next_id,
            Segment {
                file: Rc::new(segment),
                end: SEGMENT_HEADER_BYTES,
                logs: HashMap::new(),
            },
        );
        state.active = next_id;
        state.write_byte = SEGMENT_HEADER_BYTES;
        state.tail_block.clear();
        state.active_log_bytes.clear();
        state.stats.rolls += 1;
        super::wal::queue_anchors(&mut state);
    }
    tracing::debug!(shard = %wal.config().shard, segment = %next_id, "rolled WAL segment");
    // Everything before the new segment is durable: a checkpoint here lets the next
    // start skip scanning it.
    let snapshot = super::checkpoint::Snapshot::take(wal);
    let for_checkpoint = wal.clone();
    glommio::spawn_local(async move {
        if let Err(error) = snapshot.write(for_checkpoint.config()).await {
            tracing::warn!(%error, "cannot write WAL checkpoint (recovery will scan further)");
        }
    })
    .detach();
    prepare_spare(wal.clone());
    Ok(())
}

/// Starts zero-filling the next segment in the background, if not already done.
pub(super) fn prepare_spare(wal: Rc<Wal>) {
    if wal.set_preparing_spare(true) {
        return;
    }
    glommio::spawn_local(async move {
        let next_id = SegmentId(wal.state.borrow().active.0 + 1);
        let has_spare = wal.state.borrow().segments.contains_key(&next_id) || wal.take_spare().map(|s| wal.set_spare(s)).is_some();
        if !has_spare && !wal.is_closing() {
            let config = wal.config().clone();
            match SegmentFile::create(&config.dir, config.shard, next_id, config.segment_bytes, now_ms()).await {
                Ok(spare) => wal.set_spare(spare),
                Err(error) => tracing::warn!(%error, "cannot prepare the next WAL segment; will retry at roll"),
            }
        }
        wal.set_preparing_spare(false);
    })
    .detach();
}
