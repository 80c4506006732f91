//! Control frames: WAL frames of a replicated log that hold no records.
//!
//! A replicated log (one Raft group's log, see `replication/`) stores one frame
//! per Raft entry, in index order: a data entry is the client's record batch, an
//! entry without records (the no-op a new leader appends, a configuration change)
//! is a control frame of kind [`Control::Entry`]. Two more kinds carry what Raft
//! needs besides entries, ordered with the entries in the same write:
//!
//! - [`Control::Truncate`]: the log's entries from `index` on are dropped (a
//!   follower's conflicting suffix, replaced by the leader's), or, with `reset`, the
//!   whole log (a snapshot from the leader replaces it); recovery honours it, so a
//!   truncated suffix never comes back.
//! - [`Control::State`]: the group's Raft hard state (term, vote, commit) and an
//!   anchor: the index, offset and previous term of the log's next entry. The newest
//!   one is the group's durable hard state. One is written for every replicated log
//!   at the start of every segment, so a segment read on its own (after older ones
//!   were deleted, without a checkpoint) still gives every frame its Raft index.
//!
//! A control frame has the batch header (with the control attribute, zero records,
//! `base_offset` = the log's next offset, `leader_epoch` = the Raft term) and a
//! small payload; its payload CRC covers it like any batch. Clients never see one:
//! reads skip them, and produce refuses batches with the control attribute.

use bytes::{BufMut, Bytes, BytesMut};
use sluice_schema::batch;

use super::format::{self, FrameError};
use crate::types::{Epoch, LogId, Offset};

/// Payload kind byte.
const KIND_ENTRY: u8 = 1;
const KIND_TRUNCATE: u8 = 2;
const KIND_STATE: u8 = 3;

/// The bytes a control payload may hold at most (a configuration change is small).
pub const CONTROL_PAYLOAD_BYTES_MAX: usize = 64 * 1024;

/// A Raft group's durable vote state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    /// Current term.
    pub term: u64,
    /// Vote in `term` (0: none).
    pub vote: u64,
    /// Highest index known committed.
    pub commit: u64,
}

/// Where a replicated log's next entry goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Anchor {
    /// Raft index of the next entry.
    pub next_index: u64,
    /// Offset of the next entry's first record.
    pub next_offset: Offset,
    /// Term of entry `next_index - 1` (0 if none).
    pub prev_term: u64,
    /// One past the last offset of the committed entries (`hard_state.commit`):
    /// where a restarted replica's high watermark starts.
    pub commit_offset: Offset,
}

/// What a control frame says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    /// A Raft entry without records: its entry type and data.
    Entry {
        /// `eraftpb::EntryType` as a number.
        entry_type: u8,
        /// The entry's data (empty for a leader's no-op).
        data: Bytes,
        /// The entry's context.
        context: Bytes,
    },
    /// Entries from `index` on are gone; the next entry is `index` at `offset`. With
    /// `reset`, every entry is gone and the log restarts there (`prev_term` is the
    /// term of `index - 1`, from the snapshot that replaced the log).
    Truncate {
        /// First dropped index (the next entry's index).
        index: u64,
        /// The next entry's offset.
        offset: Offset,
        /// Drop the whole log.
        reset: bool,
        /// Term of `index - 1` (for `reset`).
        prev_term: u64,
    },
    /// Hard state and anchor.
    State {
        /// The hard state.
        hard_state: HardState,
        /// The anchor.
        anchor: Anchor,
    },
}

impl Control {
    /// Whether this frame is a Raft entry (takes an index).
    pub fn is_entry(&self) -> bool {
        matches!(self, Control::Entry { .. })
    }

    /// Encodes a stamped control frame for `log`.
    pub fn encode(&self, log: LogId, base_offset: Offset, epoch: Epoch, now_ms: i64) -> Bytes {
        let mut payload = BytesMut::new();
        match self {
            Control::Entry {
                entry_type,
                data,
                context,
            } => {
                payload.put_u8(KIND_ENTRY);
                payload.put_u8(*entry_type);
                payload.put_u32_le(data.len() as u32);
                payload.put_slice(data);
                payload.put_u32_le(context.len() as u32);
                payload.put_slice(context);
            }
            Control::Truncate {
                index,
                offset,
                reset,
                prev_term,
            } => {
                payload.put_u8(KIND_TRUNCATE);
                payload.put_u64_le(*index);
                payload.put_u64_le(*offset);
                payload.put_u8(u8::from(*reset));
                payload.put_u64_le(*prev_term);
            }
            Control::State { hard_state, anchor } => {
                payload.put_u8(KIND_STATE);
                payload.put_u64_le(hard_state.term);
                payload.put_u64_le(hard_state.vote);
                payload.put_u64_le(hard_state.commit);
                payload.put_u64_le(anchor.next_index);
                payload.put_u64_le(anchor.next_offset);
                payload.put_u64_le(anchor.prev_term);
                payload.put_u64_le(anchor.commit_offset);
            }
        }
        let frame_bytes = batch::HEADER_BYTES + payload.len();
        let mut frame = BytesMut::zeroed(batch::HEADER_BYTES);
        frame.extend_from_slice(&payload);
        {
            let put = |frame: &mut BytesMut, at: usize, bytes: &[u8]| {
                frame[at..at + bytes.len()].copy_from_slice(bytes)
            };
            put(&mut frame, 0, &batch::MAGIC.to_le_bytes());
            put(
                &mut frame,
                batch::FRAME_BYTES_OFFSET,
                &(frame_bytes as u32).to_le_bytes(),
            );
            put(
                &mut frame,
                batch::FORMAT_VERSION_OFFSET,
                &batch::FORMAT_VERSION.to_le_bytes(),
            );
            put(
                &mut frame,
                batch::ATTRIBUTES_OFFSET,
                &batch::ATTRIBUTE_CONTROL.to_le_bytes(),
            );
            put(
                &mut frame,
                batch::FIRST_TIMESTAMP_OFFSET,
                &now_ms.to_le_bytes(),
            );
            put(
                &mut frame,
                batch::MAX_TIMESTAMP_OFFSET,
                &now_ms.to_le_bytes(),
            );
            put(
                &mut frame,
                batch::PRODUCER_ID_OFFSET,
                &(-1i64).to_le_bytes(),
            );
            put(
                &mut frame,
                batch::PRODUCER_EPOCH_OFFSET,
                &(-1i16).to_le_bytes(),
            );
            put(
                &mut frame,
                batch::BASE_SEQUENCE_OFFSET,
                &(-1i32).to_le_bytes(),
            );
            let crc = format::payload_crc(&frame);
            put(&mut frame, batch::PAYLOAD_CRC_OFFSET, &crc.to_le_bytes());
        }
        format::stamp(&mut frame, base_offset, log, epoch);
        frame.freeze()
    }

    /// Decodes the payload of a verified control frame (`frame` is the whole frame).
    pub fn decode(frame: &[u8]) -> Result<Control, FrameError> {
        let bad = |reason: &str| FrameError::BadRecord {
            index: 0,
            reason: format!("control frame: {reason}"),
        };
        let payload = frame
            .get(batch::HEADER_BYTES..)
            .ok_or_else(|| bad("shorter than a header"))?;
        let mut reader = Reader {
            bytes: payload,
            at: 0,
        };
        let kind = reader.u8().ok_or_else(|| bad("no kind"))?;
        let control = match kind {
            KIND_ENTRY => {
                let entry_type = reader.u8().ok_or_else(|| bad("no entry type"))?;
                let data = reader.bytes().ok_or_else(|| bad("entry data truncated"))?;
                let context = reader
                    .bytes()
                    .ok_or_else(|| bad("entry context truncated"))?;
                Control::Entry {
                    entry_type,
                    data: Bytes::copy_from_slice(data),
                    context: Bytes::copy_from_slice(context),
                }
            }
            KIND_TRUNCATE => {
                let (Some(index), Some(offset), Some(reset), Some(prev_term)) =
                    (reader.u64(), reader.u64(), reader.u8(), reader.u64())
                else {
                    return Err(bad("truncate marker truncated"));
                };
                Control::Truncate {
                    index,
                    offset,
                    reset: reset != 0,
                    prev_term,
                }
            }
            KIND_STATE => {
                let mut fields = [0u64; 7];
                for field in &mut fields {
                    *field = reader.u64().ok_or_else(|| bad("state truncated"))?;
                }
                Control::State {
                    hard_state: HardState {
                        term: fields[0],
                        vote: fields[1],
                        commit: fields[2],
                    },
                    anchor: Anchor {
                        next_index: fields[3],
                        next_offset: fields[4],
                        prev_term: fields[5],
                        commit_offset: fields[6],
                    },
                }
            }
            other => return Err(bad(&format!("unknown kind {other}"))),
        };
        if reader.at != payload.len() {
            return Err(bad("bytes after the payload"));
        }
        Ok(control)
    }
}

/// True when a verified control frame is a Raft entry (not a truncation or state).
pub fn is_entry_frame(frame: &[u8]) -> bool {
    frame.get(batch::HEADER_BYTES) == Some(&KIND_ENTRY)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let slice = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(slice)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let length = self.u32()? as usize;
        if length > CONTROL_PAYLOAD_BYTES_MAX {
            return None;
        }
        self.take(length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_frames_round_trip_and_verify_as_stored_frames() {
        let kinds = [
            Control::Entry {
                entry_type: 0,
                data: Bytes::new(),
                context: Bytes::new(),
            },
            Control::Entry {
                entry_type: 2,
                data: Bytes::from_static(b"conf"),
                context: Bytes::from_static(b"ctx"),
            },
            Control::Truncate {
                index: 9,
                offset: 1000,
                reset: true,
                prev_term: 3,
            },
            Control::State {
                hard_state: HardState {
                    term: 4,
                    vote: 2,
                    commit: 8,
                },
                anchor: Anchor {
                    next_index: 9,
                    next_offset: 1000,
                    prev_term: 4,
                    commit_offset: 900,
                },
            },
        ];
        for control in kinds {
            let frame = control.encode(LogId(7), 1000, Epoch(4), 123);
            let stored = format::verify_stored(&frame, batch::HEADER_BYTES + 1024).unwrap();
            assert!(stored.control);
            assert_eq!(stored.log_id, LogId(7));
            assert_eq!(stored.base_offset, 1000);
            assert_eq!(stored.end_offset, 1000);
            assert_eq!(stored.epoch, Epoch(4));
            assert_eq!(Control::decode(&frame).unwrap(), control);
            // Clients may not send them.
            assert!(format::verify_client_batch(&frame, 1 << 20).is_err());
        }
    }

    #[test]
    fn damaged_control_payloads_are_errors_not_panics() {
        let frame = Control::Truncate {
            index: 1,
            offset: 2,
            reset: false,
            prev_term: 0,
        }
        .encode(LogId(1), 2, Epoch(1), 0);
        for cut in batch::HEADER_BYTES..frame.len() {
            assert!(Control::decode(&frame[..cut]).is_err());
        }
        let mut unknown = frame.to_vec();
        unknown[batch::HEADER_BYTES] = 99;
        assert!(Control::decode(&unknown).is_err());
    }
}
