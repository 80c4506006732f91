use proptest::prelude::*;

use super::*;
use crate::storage::testkit;

fn client_batch(values: &[Vec<u8>], timestamp: i64) -> Vec<u8> {
    let refs: Vec<&[u8]> = values.iter().map(|v| v.as_slice()).collect();
    testkit::encode_batch(timestamp, &refs)
}

proptest! {
    #[test]
    fn client_batches_verify_and_stamping_keeps_payload_crc(
        values in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..20),
        timestamp in any::<i64>(),
        base_offset in 0..u64::MAX / 2,
        log in any::<u32>(),
        epoch in any::<u32>(),
    ) {
        let mut frame = client_batch(&values, timestamp);
        let info = verify_client_batch(&frame, usize::MAX).unwrap();
        prop_assert_eq!(info.frame_bytes, frame.len());
        prop_assert_eq!(info.record_count as usize, values.len());
        let payload_crc_before = payload_crc(&frame);
        stamp(&mut frame, base_offset, LogId(log), Epoch(epoch));
        prop_assert_eq!(payload_crc(&frame), payload_crc_before);
        let stored = verify_stored(&frame, usize::MAX).unwrap();
        prop_assert_eq!(stored.base_offset, base_offset);
        prop_assert_eq!(stored.log_id, LogId(log));
        prop_assert_eq!(stored.end_offset, base_offset + values.len() as u64);
        prop_assert_eq!(stored.epoch, Epoch(epoch));
        prop_assert!(!stored.control);
    }

    #[test]
    fn any_single_byte_change_is_detected(
        values in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 1..5),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let mut frame = client_batch(&values, 7);
        stamp(&mut frame, 100, LogId(3), Epoch(1));
        let at = at.index(frame.len());
        frame[at] ^= flip;
        prop_assert!(verify_stored(&frame, usize::MAX).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = verify_client_batch(&bytes, 1 << 20);
        let _ = verify_stored(&bytes, 1 << 20);
    }

    #[test]
    fn truncated_frames_are_refused(
        values in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..64), 1..5),
        cut in any::<prop::sample::Index>(),
    ) {
        let frame = client_batch(&values, 1);
        let cut = cut.index(frame.len());
        prop_assert!(verify_client_batch(&frame[..cut], usize::MAX).is_err());
    }
}

#[test]
fn oversized_batches_are_refused_by_length() {
    let frame = client_batch(&[vec![1u8; 1000]], 1);
    let error = verify_client_batch(&frame, 500).unwrap_err();
    assert!(matches!(error, FrameError::BadLength { .. }), "{error:?}");
}

#[test]
fn segment_header_roundtrip_and_damage() {
    let header = SegmentHeader::new(ShardId(2), SegmentId(9), 1 << 20, 1234);
    let bytes = header.as_bytes().to_vec();
    let parsed = SegmentHeader::parse(&bytes).unwrap();
    assert_eq!(parsed.segment_id.get(), 9);
    let mut damaged = bytes.clone();
    damaged[20] ^= 1;
    assert!(SegmentHeader::parse(&damaged).is_err());
    let mut other_version = header;
    other_version.format_version = 99.into();
    other_version.header_crc = other_version.compute_crc().into();
    let error = SegmentHeader::parse(other_version.as_bytes()).unwrap_err();
    assert!(error.contains("version 99"), "{error}");
}

#[test]
fn compressed_batches_are_checked_by_their_decoded_records() {
    use sluice_schema::compression::Compression;
    let values: Vec<Vec<u8>> = (0..200)
        .map(|i| format!("value {}", i % 9).into_bytes())
        .collect();
    let plain = client_batch(&values, 1_700_000_000_000);
    let records = &plain[batch::HEADER_BYTES..];
    for codec in [Compression::Snappy, Compression::Lz4, Compression::Zstd] {
        let with = |attributes: u16, records_bytes: u32, section: &[u8]| {
            let mut frame = plain[..batch::HEADER_BYTES].to_vec();
            frame.extend_from_slice(section);
            let len = frame.len() as u32;
            frame[batch::FRAME_BYTES_OFFSET..][..4].copy_from_slice(&len.to_le_bytes());
            frame[batch::ATTRIBUTES_OFFSET..][..2].copy_from_slice(&attributes.to_le_bytes());
            frame[batch::RECORDS_BYTES_OFFSET..][..4].copy_from_slice(&records_bytes.to_le_bytes());
            let crc = payload_crc(&frame);
            frame[batch::PAYLOAD_CRC_OFFSET..][..4].copy_from_slice(&crc.to_le_bytes());
            frame
        };
        let mut block = Vec::new();
        codec.compress_into(records, &mut block).unwrap();
        let bits = codec.attribute_bits();
        let good = with(bits, records.len() as u32, &block);
        let info = verify_client_batch(&good, usize::MAX).unwrap();
        assert_eq!(info.record_count, 200);
        assert_eq!(info.frame_bytes, good.len());
        assert!(good.len() < plain.len());
        // Stamped and stored, it verifies as stored and keeps its codec.
        let mut stored = good.clone();
        stamp(&mut stored, 10, LogId(1), Epoch(1));
        verify_stored(&stored, usize::MAX).unwrap();
        let refused = [
            with(bits, 0, &block),
            with(bits, records.len() as u32 + 1, &block),
            with(1, records.len() as u32, &block),
            with(0, records.len() as u32, records),
            with(bits, records.len() as u32, &block[..block.len() - 1]),
            with(
                bits | batch::ATTRIBUTE_CONTROL,
                records.len() as u32,
                &block,
            ),
        ];
        for frame in refused {
            assert!(verify_client_batch(&frame, usize::MAX).is_err(), "{codec}");
        }
        // Records that decode but are malformed are refused as records.
        let mut short = Vec::new();
        codec
            .compress_into(&records[..records.len() - 1], &mut short)
            .unwrap();
        let error = verify_client_batch(&with(bits, records.len() as u32 - 1, &short), usize::MAX)
            .unwrap_err();
        assert!(
            matches!(error, FrameError::BadRecord { .. }),
            "{codec}: {error}"
        );
    }
}
