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

use crate::limits::{ERROR_MESSAGE_BYTES_MAX, FRAME_BYTES_MAX, RESPONSE_ENVELOPE_BYTES_MAX};

/// Bytes read from the socket at most at a time.
pub const READ_CHUNK_BYTES: usize = 256 * 1024;
/// Bytes read at a time while little is buffered.
pub const READ_FIRST_BYTES: usize = 16 * 1024;

/// A received frame: the envelope and the raw payload, zero-copy slices of the
/// receive buffer.
pub struct Frame {
    /// Flatbuffers envelope (not yet verified).
    pub envelope: Bytes,
    /// Raw payload after it.
    pub payload: Bytes,
    /// Bytes the frame took on the wire, prefix included.
    pub wire_bytes: usize,
    /// Microseconds from its first byte's arrival to its last (set by the
    /// connection; 0 when it came in one read).
    pub receive_us: u64,
}

/// Why the connection's framing broke (the connection is closed).
#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    /// A length prefix over the limit: refused before allocating.
    #[error("frame of {0} bytes exceeds the limit of {1} bytes")]
    TooLarge(usize, usize),
    /// A frame too short to hold its envelope length, or an envelope length that
    /// does not fit the frame.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The socket failed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
}

/// Splits a byte stream into frames. The length is checked against the current
/// limit before anything is allocated for the frame, and the buffer grows only as
/// bytes arrive (never to a declared length ahead of the bytes). Reading is
/// cancellation-safe: [`FrameReader::fill`] keeps nothing but the bytes it read.
pub struct FrameReader {
    buffer: BytesMut,
    frame_bytes_max: usize,
}

impl FrameReader {
    /// A reader accepting frames of at most `frame_bytes_max` bytes (prefix included).
    pub fn new(frame_bytes_max: usize) -> Self {
        FrameReader {
            buffer: BytesMut::new(),
            frame_bytes_max,
        }
    }

    /// Changes the frame limit (raised after the handshake).
    pub fn set_frame_bytes_max(&mut self, frame_bytes_max: usize) {
        self.frame_bytes_max = frame_bytes_max;
    }

    /// Bytes received and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// The whole length of the frame in progress, once its prefix is here.
    pub fn declared(&self) -> Option<usize> {
        let prefix: [u8; FRAME_PREFIX_BYTES] =
            self.buffer.get(..FRAME_PREFIX_BYTES)?.try_into().ok()?;
        Some(FRAME_PREFIX_BYTES.saturating_add(u32::from_le_bytes(prefix) as usize))
    }

    /// How many bytes to read next. The buffer may at most double with each read
    /// (from `READ_FIRST_BYTES`, up to `READ_CHUNK_BYTES`): a connection that has
    /// sent little — a length and nothing else — holds little memory, while one
    /// streaming a large frame reaches full-size reads within a few reads.
    pub fn bytes_wanted(&self) -> usize {
        self.buffer.len().clamp(READ_FIRST_BYTES, READ_CHUNK_BYTES)
    }

    /// Reads at most `bytes` more from `stream`; returns how many (0 at the end of
    /// the stream). If cancelled, nothing was added.
    pub async fn fill<R: AsyncRead + Unpin>(
        &mut self,
        stream: &mut R,
        bytes: usize,
    ) -> Result<usize, FramingError> {
        let mut guard = Extension::new(&mut self.buffer, bytes);
        let read = stream.read(guard.spare()).await?;
        guard.keep(read);
        Ok(read)
    }

    /// The next whole frame if it is buffered. Fails when the frame in progress is
    /// over the limit or malformed.
    pub fn try_frame(&mut self) -> Result<Option<Frame>, FramingError> {
        let Some(total) = self.declared() else {
            return Ok(None);
        };
        if total > self.frame_bytes_max {
            return Err(FramingError::TooLarge(total, self.frame_bytes_max));
        }
        let declared = total - FRAME_PREFIX_BYTES;
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
            receive_us: 0,
            envelope: frame.slice(..envelope_bytes),
            payload: frame.slice(envelope_bytes..),
            wire_bytes: total,
        }))
    }
}

/// Extends a buffer by `bytes` zeroed bytes for a read and, unless told how many
/// were read, takes them off again when dropped (so a cancelled read leaves the
/// buffer as it was).
struct Extension<'a> {
    buffer: &'a mut BytesMut,
    start: usize,
}

impl<'a> Extension<'a> {
    fn new(buffer: &'a mut BytesMut, bytes: usize) -> Self {
        let start = buffer.len();
        buffer.resize(start + bytes, 0);
        Extension { buffer, start }
    }

    fn spare(&mut self) -> &mut [u8] {
        &mut self.buffer[self.start..]
    }

    fn keep(&mut self, read: usize) {
        self.start += read;
    }
}

impl Drop for Extension<'_> {
    fn drop(&mut self) {
        self.buffer.truncate(self.start);
    }
}

/// A response ready to write: the frame head (prefix, envelope length, envelope)
/// and the payload pieces.
pub struct Outgoing {
    /// Prefix + envelope length + envelope.
    pub head: Bytes,
    /// Raw payload pieces, written after the head.
    pub payload: Vec<Bytes>,
    /// The envelope's request-level error (metrics).
    pub error: ErrorCode,
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
    let message = message.map(|m| fbb.create_string(cut_message(m)));
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
    let frame_bytes = FRAME_PREFIX_BYTES + ENVELOPE_LENGTH_BYTES + envelope.len() + payload_bytes;
    if envelope.len() > RESPONSE_ENVELOPE_BYTES_MAX || frame_bytes > FRAME_BYTES_MAX {
        // Handlers bound their responses before building them; this is the last
        // line: never a truncated length.
        let message = format!(
            "the response would be {frame_bytes} bytes (envelope {}), over the limits of {FRAME_BYTES_MAX} (envelope {RESPONSE_ENVELOPE_BYTES_MAX}); ask for less",
            envelope.len()
        );
        return error_response(correlation_id, ErrorCode::ResponseTooLarge, &message);
    }
    let mut head =
        BytesMut::with_capacity(FRAME_PREFIX_BYTES + ENVELOPE_LENGTH_BYTES + envelope.len());
    head.put_u32_le((frame_bytes - FRAME_PREFIX_BYTES) as u32);
    head.put_u32_le(envelope.len() as u32);
    head.put_slice(envelope);
    Outgoing {
        head: head.freeze(),
        payload,
        error,
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

/// An error message cut to `ERROR_MESSAGE_BYTES_MAX` bytes (at a character
/// boundary), so that a response's size is known before it is built.
pub fn cut_message(message: &str) -> &str {
    if message.len() <= ERROR_MESSAGE_BYTES_MAX {
        return message;
    }
    let mut end = ERROR_MESSAGE_BYTES_MAX;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// Worst-case bytes of a response envelope, estimated before building it:
/// handlers add what each item can take and refuse with `ResponseTooLarge` when
/// the total is over the limit.
#[derive(Default)]
pub struct ResponseSize {
    bytes: usize,
}

impl ResponseSize {
    /// Bytes of every response envelope, before any item.
    pub const BASE_BYTES: usize = 512;
    /// A table's worst-case overhead (vtable offset, padding, offsets to it).
    pub const TABLE_BYTES: usize = 64;
    /// A string field at worst: length prefix, padding and terminator.
    pub const STRING_OVERHEAD_BYTES: usize = 16;

    /// Starts at the fixed envelope overhead.
    pub fn new() -> Self {
        ResponseSize {
            bytes: Self::BASE_BYTES + ERROR_MESSAGE_BYTES_MAX,
        }
    }

    /// Adds `count` items of at most `item_bytes` each.
    pub fn add(&mut self, count: usize, item_bytes: usize) -> &mut Self {
        self.bytes = self.bytes.saturating_add(count.saturating_mul(item_bytes));
        self
    }

    /// A table with a string of `string_bytes` and an error message.
    pub fn item_with_message(string_bytes: usize) -> usize {
        Self::TABLE_BYTES + string_bytes + ERROR_MESSAGE_BYTES_MAX + 2 * Self::STRING_OVERHEAD_BYTES
    }

    /// The estimate.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// `Err` with a `ResponseTooLarge` response when over the limit.
    pub fn check(&self, correlation_id: u32, what: &str) -> Result<(), Outgoing> {
        if self.bytes <= RESPONSE_ENVELOPE_BYTES_MAX {
            return Ok(());
        }
        let message = format!(
            "the response to {what} could take {} bytes, over the limit of {RESPONSE_ENVELOPE_BYTES_MAX}; ask for fewer topics or partitions",
            self.bytes
        );
        Err(error_response(
            correlation_id,
            ErrorCode::ResponseTooLarge,
            &message,
        ))
    }
}
