//! Segment rolling and the zero-filled spare segment prepared ahead of need.

use std::collections::HashMap;
use std::rc::Rc;

use super::error::Result;
use super::segment::SegmentFile;
use super::wal::{now_ms, Segment, Wal};
use crate::limits::SEGMENT_HEADER_BYTES;
use crate::types::SegmentId;

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
