//! Framing: `u32 frame_bytes | u32 envelope_bytes | envelope | payload`, all
//! little-endian, where `frame_bytes` counts everything after itself.
//!
//! [`encode_frame_head`] writes the two length fields and the envelope; the caller
//! sends the payload after it (so record batches are never copied into the
//! envelope). [`FrameDecoder`] accumulates bytes from a socket and yields whole
//! [`Frame`]s, rejecting a length over the limit before allocating for it.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use sluice_schema::{
    ENVELOPE_BYTES_MAX, ENVELOPE_LENGTH_BYTES, FRAME_BYTES_MAX, FRAME_PREFIX_BYTES,
    RESPONSE_ENVELOPE_BYTES_MAX,
};

use crate::error::{Error, Result};

/// Bytes of both length fields.
pub const FRAME_HEAD_BYTES: usize = FRAME_PREFIX_BYTES + ENVELOPE_LENGTH_BYTES;

/// Writes the frame prefix, the envelope length and the envelope into `dst`, for a
/// frame whose raw payload (sent right after) is `payload_bytes` long.
pub fn encode_frame_head(dst: &mut BytesMut, envelope: &[u8], payload_bytes: usize) -> Result<()> {
    if envelope.len() > ENVELOPE_BYTES_MAX {
        return Err(Error::InvalidArgument(format!(
            "request envelope of {} bytes exceeds {ENVELOPE_BYTES_MAX}",
            envelope.len()
        )));
    }
    let total = FRAME_HEAD_BYTES + envelope.len() + payload_bytes;
    if total > FRAME_BYTES_MAX {
        return Err(Error::FrameTooLarge {
            bytes: total,
            bytes_max: FRAME_BYTES_MAX,
        });
    }
    dst.reserve(FRAME_HEAD_BYTES + envelope.len());
    dst.put_u32_le((total - FRAME_PREFIX_BYTES) as u32);
    dst.put_u32_le(envelope.len() as u32);
    dst.put_slice(envelope);
    Ok(())
}

/// One received frame, split into its envelope and raw payload (both zero-copy
/// slices of the receive buffer).
#[derive(Debug, Clone)]
pub struct Frame {
    /// The flatbuffers envelope.
    pub envelope: Bytes,
    /// The raw payload after the envelope.
    pub payload: Bytes,
}

/// Incremental frame decoder.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    frame_bytes_max: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new(FRAME_BYTES_MAX)
    }
}

impl FrameDecoder {
    /// A decoder accepting frames of at most `frame_bytes_max` bytes (prefix included).
    pub fn new(frame_bytes_max: usize) -> FrameDecoder {
        FrameDecoder {
            buf: BytesMut::with_capacity(64 * 1024),
            frame_bytes_max,
        }
    }

    /// The receive buffer, to read socket bytes into (`read_buf`).
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or an error if
    /// the stream is not valid framing (the connection must then be closed).
    pub fn next_frame(&mut self) -> Result<Option<Frame>> {
        let Some(prefix) = self.buf.get(..FRAME_PREFIX_BYTES) else {
            return Ok(None);
        };
        let mut prefix_bytes = [0u8; FRAME_PREFIX_BYTES];
        prefix_bytes.copy_from_slice(prefix);
        let frame_bytes = u32::from_le_bytes(prefix_bytes) as usize;
        let total = FRAME_PREFIX_BYTES + frame_bytes;
        if total > self.frame_bytes_max {
            return Err(Error::FrameTooLarge {
                bytes: total,
                bytes_max: self.frame_bytes_max,
            });
        }
        if frame_bytes < ENVELOPE_LENGTH_BYTES {
            return Err(Error::MalformedFrame(format!(
                "frame of {frame_bytes} bytes has no envelope length"
            )));
        }
        if self.buf.len() < total {
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        let mut frame = self.buf.split_to(total).freeze();
        frame.advance(FRAME_PREFIX_BYTES);
        split_envelope(frame).map(Some)
    }
}

fn split_envelope(mut frame: Bytes) -> Result<Frame> {
    let envelope_bytes = frame.get_u32_le() as usize;
    if envelope_bytes > frame.len() || envelope_bytes > RESPONSE_ENVELOPE_BYTES_MAX {
        return Err(Error::MalformedFrame(format!(
            "envelope of {envelope_bytes} bytes in a frame with {} bytes left",
            frame.len()
        )));
    }
    let envelope = frame.split_to(envelope_bytes);
    Ok(Frame {
        envelope,
        payload: frame,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(envelope: &[u8], payload: &[u8]) -> BytesMut {
        let mut dst = BytesMut::new();
        encode_frame_head(&mut dst, envelope, payload.len()).unwrap();
        dst.extend_from_slice(payload);
        dst
    }

    #[test]
    fn decodes_byte_by_byte() {
        let mut wire = encoded(b"envelope", b"payload");
        wire.extend_from_slice(&encoded(b"e2", b""));
        let mut decoder = FrameDecoder::default();
        let mut frames = Vec::new();
        for byte in wire.iter() {
            decoder.push(&[*byte]);
            while let Some(frame) = decoder.next_frame().unwrap() {
                frames.push(frame);
            }
        }
        assert_eq!(frames.len(), 2);
        assert_eq!(&frames[0].envelope[..], b"envelope");
        assert_eq!(&frames[0].payload[..], b"payload");
        assert_eq!(&frames[1].envelope[..], b"e2");
        assert!(frames[1].payload.is_empty());
        assert_eq!(decoder.buffered_bytes(), 0);
    }

    #[test]
    fn rejects_oversized_before_allocating() {
        let mut decoder = FrameDecoder::new(1024);
        decoder.push(&(u32::MAX).to_le_bytes());
        let capacity = decoder.buffer_mut().capacity();
        assert!(matches!(
            decoder.next_frame(),
            Err(Error::FrameTooLarge { .. })
        ));
        assert_eq!(decoder.buffer_mut().capacity(), capacity);
        let mut decoder = FrameDecoder::default();
        decoder.push(&((FRAME_BYTES_MAX - 3) as u32).to_le_bytes());
        assert!(matches!(
            decoder.next_frame(),
            Err(Error::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn rejects_bad_envelope_length() {
        let mut decoder = FrameDecoder::default();
        decoder.push(&2u32.to_le_bytes());
        decoder.push(&[0, 0]);
        assert!(matches!(
            decoder.next_frame(),
            Err(Error::MalformedFrame(_))
        ));
        let mut decoder = FrameDecoder::default();
        decoder.push(&8u32.to_le_bytes());
        decoder.push(&100u32.to_le_bytes());
        decoder.push(&[0; 4]);
        assert!(matches!(
            decoder.next_frame(),
            Err(Error::MalformedFrame(_))
        ));
    }

    #[test]
    fn partial_prefix_waits() {
        let mut decoder = FrameDecoder::default();
        decoder.push(&[1, 0]);
        assert!(decoder.next_frame().unwrap().is_none());
    }

    #[test]
    fn encode_rejects_oversized_payload() {
        let mut dst = BytesMut::new();
        assert!(encode_frame_head(&mut dst, b"x", FRAME_BYTES_MAX).is_err());
    }
}
