//! A minimal batch encoder for tests, tools and storage benchmarks (the real
//! encoder is in `sluice-client`, which the broker does not depend on).

use sluice_schema::batch;

fn put_varint(out: &mut Vec<u8>, value: i64) {
    let mut zigzag = ((value << 1) ^ (value >> 63)) as u64;
    loop {
        let byte = (zigzag & 0x7f) as u8;
        zigzag >>= 7;
        if zigzag == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Encodes a client batch of `values` (null keys, no headers) with the given
/// timestamp, CRC included, broker fields zero.
pub fn encode_batch(timestamp_ms: i64, values: &[&[u8]]) -> Vec<u8> {
    assert!(!values.is_empty(), "a batch holds at least one record");
    let mut out = vec![0u8; batch::HEADER_BYTES];
    let mut record = Vec::new();
    for (delta, value) in values.iter().enumerate() {
        record.clear();
        record.push(0); // attributes
        put_varint(&mut record, 0); // timestamp delta
        put_varint(&mut record, delta as i64);
        put_varint(&mut record, -1); // null key
        put_varint(&mut record, value.len() as i64);
        record.extend_from_slice(value);
        put_varint(&mut record, 0); // headers
        put_varint(&mut out, record.len() as i64);
        out.extend_from_slice(&record);
    }
    let count = values.len() as u32;
    let frame_bytes = out.len() as u32;
    let put = |out: &mut Vec<u8>, at: usize, bytes: &[u8]| {
        out[at..at + bytes.len()].copy_from_slice(bytes)
    };
    put(&mut out, 0, &batch::MAGIC.to_le_bytes());
    put(
        &mut out,
        batch::FRAME_BYTES_OFFSET,
        &frame_bytes.to_le_bytes(),
    );
    put(
        &mut out,
        batch::FORMAT_VERSION_OFFSET,
        &batch::FORMAT_VERSION.to_le_bytes(),
    );
    put(&mut out, batch::RECORD_COUNT_OFFSET, &count.to_le_bytes());
    put(
        &mut out,
        batch::LAST_OFFSET_DELTA_OFFSET,
        &(count - 1).to_le_bytes(),
    );
    put(
        &mut out,
        batch::FIRST_TIMESTAMP_OFFSET,
        &timestamp_ms.to_le_bytes(),
    );
    put(
        &mut out,
        batch::MAX_TIMESTAMP_OFFSET,
        &timestamp_ms.to_le_bytes(),
    );
    put(&mut out, batch::PRODUCER_ID_OFFSET, &(-1i64).to_le_bytes());
    put(
        &mut out,
        batch::PRODUCER_EPOCH_OFFSET,
        &(-1i16).to_le_bytes(),
    );
    put(
        &mut out,
        batch::BASE_SEQUENCE_OFFSET,
        &(-1i32).to_le_bytes(),
    );
    let crc = crc32fast::hash(&out[batch::PAYLOAD_CRC_START..]);
    put(&mut out, batch::PAYLOAD_CRC_OFFSET, &crc.to_le_bytes());
    out
}

/// Encodes a single-record batch whose value is `bytes` long and filled from `seed`.
pub fn batch_of_size(timestamp_ms: i64, records: usize, value_bytes: usize, seed: u64) -> Vec<u8> {
    let mut value = vec![0u8; value_bytes];
    let mut x = seed | 1;
    for byte in value.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = x as u8;
    }
    let values: Vec<&[u8]> = (0..records.max(1)).map(|_| value.as_slice()).collect();
    encode_batch(timestamp_ms, &values)
}
