//! Raw-protocol helpers for black-box tests: build batches and requests, send them
//! on a [`Raw`] connection and pick the interesting fields out of the replies.

#![allow(clippy::unwrap_used, missing_docs)]

use bytes::Bytes;
use flatbuffers::FlatBufferBuilder;
use sluice_client::batch::BatchBuilder;
use sluice_client::request::{
    FetchPartitionSpec, ListOffsetsSpec, NewTopic, OffsetQuery, ProducePartitionRange,
    ProduceTopicRanges, RequestBody,
};
use sluice_schema::batch as layout;
use sluice_schema::wire::{self, ErrorCode};

use crate::Raw;

/// A batch of `values` (null keys) stamped with the current time (an old
/// timestamp would fall to the default 7-day retention while a test runs).
pub fn batch(values: &[&[u8]]) -> Bytes {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut builder = BatchBuilder::with_capacity(1024);
    for value in values {
        builder.append(now, None, Some(value), &[]).unwrap();
    }
    builder.finish().unwrap()
}

pub fn create(raw: &mut Raw, name: &str, partitions: u32, configs: &[(&str, &str)]) -> ErrorCode {
    let body = RequestBody::CreateTopics {
        topics: vec![NewTopic {
            name: name.into(),
            partitions,
            configs: configs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            replication_factor: 0,
        }],
        validate_only: false,
    };
    let reply = raw.request(&body, &[]).unwrap();
    let response = reply.response();
    let results = response
        .body_as_create_topics_response()
        .unwrap()
        .results()
        .unwrap();
    results.get(0).error()
}

/// Produces `payload` to one partition; returns (error, base offset, message).
pub fn produce(
    raw: &mut Raw,
    topic: &str,
    partition: u32,
    payload: &[u8],
    acks: i8,
) -> (ErrorCode, u64, String) {
    let body = RequestBody::Produce {
        acks,
        timeout_ms: 10_000,
        topics: vec![ProduceTopicRanges {
            name: topic.into(),
            partitions: vec![ProducePartitionRange {
                partition,
                payload_offset: 0,
                payload_bytes: payload.len() as u32,
            }],
        }],
    };
    let reply = raw.request(&body, payload).unwrap();
    let response = reply.response();
    assert_eq!(
        response.error(),
        ErrorCode::None,
        "{:?}",
        response.message()
    );
    let result = response
        .body_as_produce_response()
        .unwrap()
        .topics()
        .unwrap()
        .get(0)
        .partitions()
        .unwrap()
        .get(0);
    (
        result.error(),
        result.base_offset(),
        result.message().unwrap_or_default().to_string(),
    )
}

/// A fetch of up to 1 MiB from one partition, without waiting.
pub fn fetch_body(topic: &str, partition: u32, offset: u64) -> RequestBody {
    RequestBody::Fetch {
        max_wait_ms: 0,
        min_bytes: 0,
        max_bytes: 1 << 20,
        topics: vec![(
            topic.into(),
            vec![FetchPartitionSpec {
                partition,
                offset,
                max_bytes: 1 << 20,
                ..Default::default()
            }],
        )],
    }
}

/// Fetches from an offset; returns (error, high watermark, log start, payload bytes).
pub fn fetch(
    raw: &mut Raw,
    topic: &str,
    partition: u32,
    offset: u64,
) -> (ErrorCode, u64, u64, usize) {
    let reply = raw
        .request(&fetch_body(topic, partition, offset), &[])
        .unwrap();
    let response = reply.response();
    let result = first_fetch_result(&response);
    (
        result.error(),
        result.high_watermark(),
        result.log_start_offset(),
        result.payload_bytes() as usize,
    )
}

/// The first partition result of a fetch response.
pub fn first_fetch_result<'a>(response: &wire::Response<'a>) -> wire::FetchPartitionResult<'a> {
    response
        .body_as_fetch_response()
        .unwrap()
        .topics()
        .unwrap()
        .get(0)
        .partitions()
        .unwrap()
        .get(0)
}

pub fn high_watermark(raw: &mut Raw, topic: &str, partition: u32) -> u64 {
    let body = RequestBody::ListOffsets {
        topics: vec![(
            topic.into(),
            vec![ListOffsetsSpec {
                partition,
                query: OffsetQuery::Latest,
            }],
        )],
    };
    let reply = raw.request(&body, &[]).unwrap();
    let response = reply.response();
    response
        .body_as_list_offsets_response()
        .unwrap()
        .topics()
        .unwrap()
        .get(0)
        .partitions()
        .unwrap()
        .get(0)
        .offset()
}

/// A request envelope with a chosen union tag and version.
pub fn envelope(kind: u8, version: u16) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::new();
    let body = wire::ListTopicsRequest::create(&mut fbb, &wire::ListTopicsRequestArgs {});
    let request = wire::Request::create(
        &mut fbb,
        &wire::RequestArgs {
            correlation_id: 77,
            version,
            client_id: None,
            body_type: wire::RequestBody(kind),
            body: Some(body.as_union_value()),
        },
    );
    fbb.finish(request, None);
    framed(fbb.finished_data(), &[])
}

pub fn framed(envelope: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&((4 + envelope.len() + payload.len()) as u32).to_le_bytes());
    out.extend_from_slice(&(envelope.len() as u32).to_le_bytes());
    out.extend_from_slice(envelope);
    out.extend_from_slice(payload);
    out
}

/// Varint (zigzag) encoding.
pub fn varint(value: i64, out: &mut Vec<u8>) {
    let mut zigzag = ((value << 1) ^ (value >> 63)) as u64;
    while zigzag >= 0x80 {
        out.push(zigzag as u8 | 0x80);
        zigzag >>= 7;
    }
    out.push(zigzag as u8);
}

/// A record: the fields after its length, with the length prefixed.
pub fn record(fields: &[i64], value: &[u8], tail: &[i64]) -> Vec<u8> {
    let mut body = vec![0u8]; // attributes
    for field in fields {
        varint(*field, &mut body);
    }
    body.extend_from_slice(value);
    for field in tail {
        varint(*field, &mut body);
    }
    let mut out = Vec::new();
    varint(body.len() as i64, &mut out);
    out.extend_from_slice(&body);
    out
}

/// A good record: timestamp delta 0, offset delta `index`, null key, value "abc",
/// no headers.
pub fn good(index: i64) -> Vec<u8> {
    record(&[0, index, -1, 3], b"abc", &[0])
}

/// A batch frame around `records` claiming `count` records, with valid header
/// fields and CRC.
pub fn seal(records: &[u8], count: u32) -> Vec<u8> {
    seal_as(records, count, 0, 0)
}

/// As [`seal`], with the codec bits `attributes` and the header's
/// `records_bytes`; `section` is what follows the header (a compressed block or
/// anything else).
pub fn seal_as(section: &[u8], count: u32, attributes: u16, records_bytes: u32) -> Vec<u8> {
    let mut frame = vec![0u8; layout::HEADER_BYTES];
    frame.extend_from_slice(section);
    let len = frame.len() as u32;
    let put = |frame: &mut Vec<u8>, at: usize, bytes: &[u8]| {
        frame[at..at + bytes.len()].copy_from_slice(bytes)
    };
    put(&mut frame, 0, &layout::MAGIC.to_le_bytes());
    put(&mut frame, layout::FRAME_BYTES_OFFSET, &len.to_le_bytes());
    put(
        &mut frame,
        layout::FORMAT_VERSION_OFFSET,
        &layout::FORMAT_VERSION.to_le_bytes(),
    );
    put(
        &mut frame,
        layout::RECORD_COUNT_OFFSET,
        &count.to_le_bytes(),
    );
    put(
        &mut frame,
        layout::LAST_OFFSET_DELTA_OFFSET,
        &count.saturating_sub(1).to_le_bytes(),
    );
    put(
        &mut frame,
        layout::PRODUCER_ID_OFFSET,
        &(-1i64).to_le_bytes(),
    );
    put(
        &mut frame,
        layout::PRODUCER_EPOCH_OFFSET,
        &(-1i16).to_le_bytes(),
    );
    put(
        &mut frame,
        layout::BASE_SEQUENCE_OFFSET,
        &(-1i32).to_le_bytes(),
    );
    // Stamped now: a timestamp of 0 falls to the default 7-day retention while
    // the test runs.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    put(
        &mut frame,
        layout::FIRST_TIMESTAMP_OFFSET,
        &now.to_le_bytes(),
    );
    put(&mut frame, layout::MAX_TIMESTAMP_OFFSET, &now.to_le_bytes());
    put(
        &mut frame,
        layout::ATTRIBUTES_OFFSET,
        &attributes.to_le_bytes(),
    );
    put(
        &mut frame,
        layout::RECORDS_BYTES_OFFSET,
        &records_bytes.to_le_bytes(),
    );
    let crc = crc32fast::hash(&frame[layout::PAYLOAD_CRC_START..]);
    put(&mut frame, layout::PAYLOAD_CRC_OFFSET, &crc.to_le_bytes());
    frame
}
