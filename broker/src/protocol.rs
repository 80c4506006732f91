//! Client protocol framing on the broker side: reading frames with the length
//! checked before any allocation, verifying envelopes, and assembling responses.
//!
//! Frame: `u32 frame_bytes | u32 envelope_bytes | envelope | payload` (LE), where
//! `frame_bytes` counts everything after itself. See `docs/protocol.md`.

use bytes::{BufMut, Bytes, BytesMut};
use flatbuffers::{FlatBufferBuilder, UnionWIPOffset, WIPOffset};
use futures_lite::{AsyncRead, AsyncReadExt};
use sluice_schema::wire::{self, ErrorCode};
use sluice_schema::{ENVELOPE_BYTES_MAX, ENVELOPE_LENGTH_BYTES, FRAME_PREFIX_BYTES};

use crate::limits::FRAME_BYTES_MAX;

/// Bytes read from the socket at a time when no frame is in progress.
const READ_CHUNK_BYTES: usize = 256 * 1024;

/// A received frame: the envelope and the raw payload, zero-copy slices of the
/// receive buffer.
pub struct Frame {
    /// Flatbuffers envelope (not yet verified).
    pub envelope: Bytes,
    /// Raw payload after it.
    pub payload: Bytes,
}

/// Why the connection's framing broke (the connection is closed).
#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    /// A length prefix over the limit: refused before allocating.
    #[error("frame of {0} bytes exceeds the limit of {FRAME_BYTES_MAX}")]
    TooLarge(usize),
    /// A frame too short to hold its envelope length, or an envelope length that
    /// does not fit the frame.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The socket failed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads frames from a byte stream.
pub struct FrameReader {
    buffer: BytesMut,
}

impl Default for FrameReader {
    fn default() -> Self {
        FrameReader {
            buffer: BytesMut::with_capacity(READ_CHUNK_BYTES),
        }
    }
}

impl FrameReader {
    /// The next frame, `None` at a clean end of stream.
    pub async fn next<R: AsyncRead + Unpin>(
        &mut self,
        stream: &mut R,
    ) -> Result<Option<Frame>, FramingError> {
        loop {
            if let Some(frame) = self.try_frame()? {
                return Ok(Some(frame));
            }
            let wanted = self.bytes_wanted();
            let old = self.buffer.len();
            self.buffer.resize(old + wanted, 0);
            let read = stream.read(&mut self.buffer[old..]).await;
            let read = match read {
                Ok(read) => read,
                Err(error) => {
                    self.buffer.truncate(old);
                    return Err(error.into());
                }
            };
            self.buffer.truncate(old + read);
            if read == 0 {
                return if old == 0 {
                    Ok(None)
                } else {
                    Err(FramingError::Io(std::io::ErrorKind::UnexpectedEof.into()))
                };
            }
        }
    }

    /// Bytes to read next: the rest of the frame in progress, or a chunk.
    fn bytes_wanted(&self) -> usize {
        if self.buffer.len() >= FRAME_PREFIX_BYTES {
            let declared =
                u32::from_le_bytes(self.buffer[..4].try_into().unwrap_or_default()) as usize;
            let total = FRAME_PREFIX_BYTES + declared;
            if total > self.buffer.len() {
                return (total - self.buffer.len()).max(64 * 1024);
            }
        }
        READ_CHUNK_BYTES
    }

    fn try_frame(&mut self) -> Result<Option<Frame>, FramingError> {
        if self.buffer.len() < FRAME_PREFIX_BYTES {
            return Ok(None);
        }
        let declared = u32::from_le_bytes(self.buffer[..4].try_into().unwrap_or_default()) as usize;
        let total = FRAME_PREFIX_BYTES.saturating_add(declared);
        if total > FRAME_BYTES_MAX {
            return Err(FramingError::TooLarge(total));
        }
        if declared < ENVELOPE_LENGTH_BYTES {
            return Err(FramingError::Malformed(format!(
                "frame length {declared} cannot hold an envelope length"
            )));
        }
        if self.buffer.len() < total {
            return Ok(None);
        }
        let mut frame = self.buffer.split_to(total);
        let _ = frame.split_to(FRAME_PREFIX_BYTES);
        let envelope_bytes = u32::from_le_bytes(frame[..4].try_into().unwrap_or_default()) as usize;
        if envelope_bytes > frame.len() - ENVELOPE_LENGTH_BYTES
            || envelope_bytes > ENVELOPE_BYTES_MAX
        {
            return Err(FramingError::Malformed(format!(
                "envelope length {envelope_bytes} does not fit a frame of {declared} bytes"
            )));
        }
        let _ = frame.split_to(ENVELOPE_LENGTH_BYTES);
        let frame = frame.freeze();
        Ok(Some(Frame {
            envelope: frame.slice(..envelope_bytes),
            payload: frame.slice(envelope_bytes..),
        }))
    }
}

/// A response ready to write: the frame head (prefix, envelope length, envelope)
/// and the payload pieces.
pub struct Outgoing {
    /// Prefix + envelope length + envelope.
    pub head: Bytes,
    /// Raw payload pieces, written after the head.
    pub payload: Vec<Bytes>,
}

impl Outgoing {
    /// Bytes of the whole frame.
    pub fn bytes(&self) -> usize {
        self.head.len() + self.payload.iter().map(Bytes::len).sum::<usize>()
    }
}

/// Finishes a response envelope and frames it.
pub fn finish(
    mut fbb: FlatBufferBuilder<'_>,
    correlation_id: u32,
    error: ErrorCode,
    message: Option<&str>,
    body: Option<(wire::ResponseBody, WIPOffset<UnionWIPOffset>)>,
    payload: Vec<Bytes>,
) -> Outgoing {
    let message = message.map(|m| fbb.create_string(m));
    let (body_type, body) = match body {
        Some((kind, offset)) => (kind, Some(offset)),
        None => (wire::ResponseBody::NONE, None),
    };
    let response = wire::Response::create(
        &mut fbb,
        &wire::ResponseArgs {
            correlation_id,
            error,
            message,
            body_type,
            body,
        },
    );
    fbb.finish(response, None);
    let envelope = fbb.finished_data();
    let payload_bytes: usize = payload.iter().map(Bytes::len).sum();
    let mut head =
        BytesMut::with_capacity(FRAME_PREFIX_BYTES + ENVELOPE_LENGTH_BYTES + envelope.len());
    head.put_u32_le((ENVELOPE_LENGTH_BYTES + envelope.len() + payload_bytes) as u32);
    head.put_u32_le(envelope.len() as u32);
    head.put_slice(envelope);
    Outgoing {
        head: head.freeze(),
        payload,
    }
}

/// A successful response with a body (and optional raw payload).
pub fn ok(
    fbb: FlatBufferBuilder<'_>,
    correlation_id: u32,
    kind: wire::ResponseBody,
    body: WIPOffset<UnionWIPOffset>,
    payload: Vec<Bytes>,
) -> Outgoing {
    finish(
        fbb,
        correlation_id,
        ErrorCode::None,
        None,
        Some((kind, body)),
        payload,
    )
}

/// A request-level error response (no body).
pub fn error_response(correlation_id: u32, error: ErrorCode, message: &str) -> Outgoing {
    finish(
        FlatBufferBuilder::with_capacity(256),
        correlation_id,
        error,
        Some(message),
        None,
        Vec::new(),
    )
}
