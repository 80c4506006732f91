//! How group state is kept in `__sluice_offsets`: ordinary record batches whose
//! records are keyed by what they describe, the latest record of a key winning
//! (a null value deletes the key):
//!
//! - key `group/<group id>`, value: the group's membership and assignment (JSON,
//!   [`Group`] without offsets);
//! - key `offset/<group id>/<topic>/<partition>`, value: a [`Committed`] (JSON).
//!
//! Group ids and topic names cannot contain `/`, so keys are unambiguous; JSON keeps
//! the topic readable with `sluice consume __sluice_offsets`.

use bytes::{BufMut, Bytes, BytesMut};
use sluice_schema::batch;

use super::state::{Committed, Group, TopicPartition};
use crate::storage::format;

/// One record of the offsets topic, decoded.
#[derive(Debug)]
pub enum Entry {
    /// A group's state (None: deleted).
    Group(String, Option<Group>),
    /// A committed offset (None: deleted).
    Offset(String, TopicPartition, Option<Committed>),
}

impl Entry {
    /// The record's key and value.
    pub fn encode(&self) -> (Vec<u8>, Option<Vec<u8>>) {
        match self {
            Entry::Group(id, group) => (
                format!("group/{id}").into_bytes(),
                group
                    .as_ref()
                    .map(|g| serde_json::to_vec(g).expect("group state serializes")),
            ),
            Entry::Offset(id, (topic, partition), committed) => (
                format!("offset/{id}/{topic}/{partition}").into_bytes(),
                committed
                    .as_ref()
                    .map(|c| serde_json::to_vec(c).expect("offset serializes")),
            ),
        }
    }

    /// Decodes a record; `Err` names what is wrong (the record is skipped).
    pub fn decode(key: Option<&[u8]>, value: Option<&[u8]>) -> Result<Entry, String> {
        let key = std::str::from_utf8(key.ok_or("record without a key")?)
            .map_err(|_| "key is not UTF-8".to_string())?;
        let mut parts = key.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("group"), Some(id), None, None) => {
                let group = value
                    .map(|v| serde_json::from_slice::<Group>(v).map_err(|e| e.to_string()))
                    .transpose()?;
                Ok(Entry::Group(id.to_owned(), group))
            }
            (Some("offset"), Some(id), Some(topic), Some(partition)) if parts.next().is_none() => {
                let partition: u32 = partition
                    .parse()
                    .map_err(|_| format!("bad partition in key {key:?}"))?;
                let committed = value
                    .map(|v| serde_json::from_slice::<Committed>(v).map_err(|e| e.to_string()))
                    .transpose()?;
                Ok(Entry::Offset(
                    id.to_owned(),
                    (topic.to_owned(), partition),
                    committed,
                ))
            }
            _ => Err(format!("unknown key {key:?}")),
        }
    }
}

/// Encodes records as one client-style batch (offsets, log id and epoch are
/// stamped on append, as for any produced batch).
pub fn encode_batch(records: &[(Vec<u8>, Option<Vec<u8>>)], timestamp_ms: i64) -> Bytes {
    let mut buf = BytesMut::with_capacity(
        batch::HEADER_BYTES
            + records
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + 32)
                .sum::<usize>(),
    );
    buf.resize(batch::HEADER_BYTES, 0);
    for (index, (key, value)) in records.iter().enumerate() {
        let mut body = BytesMut::new();
        body.put_u8(0);
        put_varint(&mut body, 0);
        put_varint(&mut body, index as i64);
        put_varint(&mut body, key.len() as i64);
        body.put_slice(key);
        match value {
            Some(value) => {
                put_varint(&mut body, value.len() as i64);
                body.put_slice(value);
            }
            None => put_varint(&mut body, -1),
        }
        put_varint(&mut body, 0);
        put_varint(&mut buf, body.len() as i64);
        buf.put_slice(&body);
    }
    let frame_bytes = buf.len() as u32;
    let count = records.len() as u32;
    let header = &mut buf[..batch::HEADER_BYTES];
    header[0..4].copy_from_slice(&batch::MAGIC.to_le_bytes());
    header[batch::FRAME_BYTES_OFFSET..][..4].copy_from_slice(&frame_bytes.to_le_bytes());
    header[batch::FORMAT_VERSION_OFFSET..][..2]
        .copy_from_slice(&batch::FORMAT_VERSION.to_le_bytes());
    header[batch::RECORD_COUNT_OFFSET..][..4].copy_from_slice(&count.to_le_bytes());
    header[batch::LAST_OFFSET_DELTA_OFFSET..][..4]
        .copy_from_slice(&count.saturating_sub(1).to_le_bytes());
    header[batch::FIRST_TIMESTAMP_OFFSET..][..8].copy_from_slice(&timestamp_ms.to_le_bytes());
    header[batch::MAX_TIMESTAMP_OFFSET..][..8].copy_from_slice(&timestamp_ms.to_le_bytes());
    header[batch::PRODUCER_ID_OFFSET..][..8].copy_from_slice(&(-1i64).to_le_bytes());
    header[batch::PRODUCER_EPOCH_OFFSET..][..2].copy_from_slice(&(-1i16).to_le_bytes());
    header[batch::BASE_SEQUENCE_OFFSET..][..4].copy_from_slice(&(-1i32).to_le_bytes());
    let crc = crc32fast::hash(&buf[batch::PAYLOAD_CRC_START..]);
    buf[batch::PAYLOAD_CRC_OFFSET..][..4].copy_from_slice(&crc.to_le_bytes());
    buf.freeze()
}

fn put_varint(buf: &mut BytesMut, value: i64) {
    let mut raw = ((value << 1) ^ (value >> 63)) as u64;
    while raw >= 0x80 {
        buf.put_u8((raw as u8) | 0x80);
        raw >>= 7;
    }
    buf.put_u8(raw as u8);
}

/// A decoded record: offset, key, value.
pub type RawRecord<'a> = (u64, Option<&'a [u8]>, Option<&'a [u8]>);

/// The records of a stored (stamped, verified) batch frame. Headers are skipped.
/// Stops at the first malformed record (stored frames were checked on append).
pub fn records(frame: &[u8]) -> Vec<RawRecord<'_>> {
    let mut out = Vec::new();
    if frame.len() < batch::HEADER_BYTES {
        return out;
    }
    let read_u32 = |at: usize| u32::from_le_bytes(frame[at..at + 4].try_into().expect("4 bytes"));
    let base = u64::from_le_bytes(
        frame[batch::BASE_OFFSET_OFFSET..][..8]
            .try_into()
            .expect("8 bytes"),
    );
    let count = read_u32(batch::RECORD_COUNT_OFFSET);
    let mut at = batch::HEADER_BYTES;
    for _ in 0..count {
        let Some(length) = format::varint(frame, &mut at, 5) else {
            break;
        };
        let Some(end) = usize::try_from(length)
            .ok()
            .and_then(|l| at.checked_add(l))
            .filter(|end| *end <= frame.len())
        else {
            break;
        };
        let record = &frame[..end];
        let mut p = at + 1;
        let fields = (|| {
            format::varint(record, &mut p, 10)?;
            let delta = format::varint(record, &mut p, 5)?;
            let key = bytes_field(record, &mut p)?;
            let value = bytes_field(record, &mut p)?;
            Some((base + delta as u64, key, value))
        })();
        match fields {
            Some(fields) => out.push(fields),
            None => break,
        }
        at = end;
    }
    out
}

fn bytes_field<'a>(record: &'a [u8], at: &mut usize) -> Option<Option<&'a [u8]>> {
    let length = format::varint(record, at, 5)?;
    if length < 0 {
        return Some(None);
    }
    let end = at.checked_add(length as usize)?;
    let bytes = record.get(*at..end)?;
    *at = end;
    Some(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_of_entries_verifies_and_decodes_back() {
        let committed = Committed {
            offset: 42,
            metadata: "m".into(),
            commit_timestamp_ms: 7,
        };
        let entries = [
            Entry::Offset("g".into(), ("orders".into(), 3), Some(committed.clone())),
            Entry::Group("g".into(), None),
        ];
        let encoded: Vec<_> = entries.iter().map(Entry::encode).collect();
        let frame = encode_batch(&encoded, 1000);
        let info = format::verify_client_batch(&frame, 1 << 20).unwrap();
        assert_eq!(info.record_count, 2);
        let decoded = records(&frame);
        assert_eq!(decoded.len(), 2);
        match Entry::decode(decoded[0].1, decoded[0].2).unwrap() {
            Entry::Offset(g, tp, Some(c)) => {
                assert_eq!((g.as_str(), tp), ("g", ("orders".to_string(), 3)));
                assert_eq!(c, committed);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Entry::decode(decoded[1].1, decoded[1].2).unwrap(),
            Entry::Group(g, None) if g == "g"
        ));
    }
}
