//! Entry points of the fuzz targets in `fuzz/` (cargo-fuzz, nightly), also run by
//! `cargo test` over the committed seed corpus (`tests/tests/fuzz_corpus.rs`), so
//! CI exercises them on stable. Each takes arbitrary bytes and must not panic,
//! hang, or allocate beyond what its input justifies; the checks here assert the
//! invariants the code promises on the way.

use futures_lite::io::AsyncRead;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::limits::{BATCH_BYTES_MAX, FRAME_BYTES_MAX, HANDSHAKE_FRAME_BYTES_MAX};
use crate::protocol::FrameReader;
use crate::storage::checkpoint::Snapshot;
use crate::storage::scan::{scan_in_memory, ScanMode};
use crate::storage::{format, inspect};
use crate::types::SegmentId;

/// A byte stream that hands out at most `chunk` bytes per read.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let n = buf.len().min(self.chunk).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(n))
    }
}

/// The broker's frame reader over a stream cut into arbitrary read sizes (the
/// first input byte picks the size and whether the handshake limit applies).
pub fn frame_reader(data: &[u8]) {
    let Some((control, stream)) = data.split_first() else {
        return;
    };
    let limit = if control & 0x80 != 0 {
        HANDSHAKE_FRAME_BYTES_MAX
    } else {
        FRAME_BYTES_MAX
    };
    let mut reader = FrameReader::new(limit);
    let mut source = Chunked {
        data: stream,
        chunk: usize::from(control & 0x7f) * 37 + 1,
    };
    let mut consumed = 0usize;
    futures_lite::future::block_on(async {
        loop {
            match reader.try_frame() {
                Ok(Some(frame)) => {
                    assert!(frame.wire_bytes <= limit);
                    assert_eq!(
                        frame.wire_bytes,
                        8 + frame.envelope.len() + frame.payload.len()
                    );
                    consumed += frame.wire_bytes;
                    continue;
                }
                Ok(None) => {}
                Err(_) => return,
            }
            let wanted = reader.bytes_wanted();
            match reader.fill(&mut source, wanted).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            // The buffer only ever holds what arrived.
            assert!(reader.buffered() + consumed <= stream.len());
        }
    });
}

/// The envelope verifier and every check a handler makes before touching a shard.
pub fn request(data: &[u8]) {
    let _ = crate::api::check_request(data);
}

/// A client batch as Produce verifies it: structure, CRC, then every record.
pub fn client_batch(data: &[u8]) {
    let mut at = 0;
    while at < data.len() {
        match format::verify_client_batch(&data[at..], BATCH_BYTES_MAX) {
            Ok(info) => {
                assert!(info.frame_bytes >= sluice_schema::batch::HEADER_BYTES);
                at += info.frame_bytes;
            }
            Err(_) => return,
        }
    }
}

/// WAL recovery's scan of one segment (both modes) and the inspect tool's walk,
/// over arbitrary segment bytes (the first input byte picks the window).
pub fn wal_scan(data: &[u8]) {
    let Some((control, bytes)) = data.split_first() else {
        return;
    };
    let window = u64::from(*control) * 512;
    for may_be_torn in [false, true] {
        let mode = ScanMode {
            segment: SegmentId(1),
            start: crate::limits::SEGMENT_HEADER_BYTES,
            may_be_torn,
            window,
        };
        let (result, logs, stats) = scan_in_memory(bytes, mode);
        if result.is_ok() {
            // Truncation markers drop entries scanned before them: never more.
            let indexed: u64 = logs.values().map(|log| log.stored_bytes).sum();
            assert!(indexed <= stats.bytes);
            for log in logs.values() {
                let runs: u64 = log.runs.iter().map(|r| u64::from(r.bytes)).sum();
                assert_eq!(runs, log.stored_bytes, "a log's runs add up to its bytes");
                for pair in log.runs.iter().collect::<Vec<_>>().windows(2) {
                    assert_eq!(
                        pair[0].end_offset, pair[1].base_offset,
                        "runs continue in offsets"
                    );
                    assert_eq!(
                        pair[0].end_index(),
                        pair[1].first_index,
                        "runs continue in indexes"
                    );
                }
                assert!(log
                    .runs
                    .back()
                    .is_none_or(|r| r.end_index() == log.end_index));
            }
        }
    }
    let _ = inspect::inspect_bytes(bytes);
}

/// The checkpoint parser; what it accepts re-encodes to the same bytes.
pub fn checkpoint(data: &[u8]) {
    if let Ok(snapshot) = Snapshot::decode(data) {
        let encoded = snapshot.encode();
        let again = Snapshot::decode(&encoded).expect("a decoded checkpoint re-encodes");
        assert_eq!(again.logs.len(), snapshot.logs.len());
    }
}
