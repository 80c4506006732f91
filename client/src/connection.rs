//! One TCP connection to a broker: handshake, then a writer task and a reader
//! task. Requests are pipelined: each gets a correlation id and a oneshot in the
//! pending map; the reader task completes them in whatever order responses come.
//! When the socket fails or closes, every pending request fails with
//! [`Error::ConnectionClosed`] and new requests fail immediately.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use flatbuffers::FlatBufferBuilder;
use sluice_schema::{PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::frame::FrameDecoder;
use crate::request::{encode_request_frame, RequestBody};
use crate::response::{decode_response, HandshakeInfo, Response, ResponseBody};

/// Payload parts at least this large are written straight from their buffer
/// instead of being copied into the coalescing write buffer.
const WRITE_DIRECT_BYTES_MIN: usize = 16 * 1024;
/// Bytes the write buffer may coalesce before it is written out.
const WRITE_COALESCE_BYTES_MAX: usize = 256 * 1024;
/// Spare capacity kept in the receive buffer before each read.
const READ_CHUNK_BYTES: usize = 64 * 1024;

type Reply = oneshot::Sender<Result<Response>>;

/// What the writer task sends: a frame head and the payload parts after it.
struct Outgoing {
    head: Bytes,
    payload: Vec<Bytes>,
    /// Told once the frame is written to the socket (requests with no response).
    written: Option<oneshot::Sender<Result<()>>>,
}

#[derive(Default)]
struct Pending {
    waiting: HashMap<u32, Reply>,
    closed: Option<String>,
}

/// An established, handshaken connection.
pub(crate) struct Connection {
    addr: String,
    client_id: String,
    info: HandshakeInfo,
    next_correlation_id: AtomicU32,
    pending: Arc<Mutex<Pending>>,
    outgoing: mpsc::UnboundedSender<Outgoing>,
    reader: JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        // The writer task ends when `outgoing` drops; the reader may block on a
        // silent socket, so stop it explicitly.
        self.reader.abort();
    }
}

/// How long one connection's handshake may go unanswered before the client
/// tries a new connection (see [`Connection::open`]).
pub const HANDSHAKE_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
const HANDSHAKE_UNANSWERED: &str = "handshake timed out";

impl Connection {
    /// Connects, sets TCP_NODELAY and performs the handshake, within
    /// `connect_timeout`. A connection whose handshake goes unanswered for
    /// [`HANDSHAKE_ATTEMPT_TIMEOUT`] is dropped and the connection tried again:
    /// right after a broker restarts on the same port, the kernel may still hand
    /// some connections to listening sockets its crashed predecessor left behind
    /// (they are torn down asynchronously), and those never answer.
    pub(crate) async fn open(
        addr: &str,
        client_id: &str,
        connect_timeout: Duration,
    ) -> Result<Connection> {
        let deadline = tokio::time::Instant::now() + connect_timeout;
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let attempt = remaining.min(HANDSHAKE_ATTEMPT_TIMEOUT);
            match Connection::open_once(addr, client_id, remaining, attempt).await {
                Err(Error::Connect { reason, .. })
                    if reason == HANDSHAKE_UNANSWERED && tokio::time::Instant::now() < deadline =>
                {
                    tracing::debug!(%addr, "handshake unanswered; connecting again");
                }
                other => return other,
            }
        }
    }

    async fn open_once(
        addr: &str,
        client_id: &str,
        connect_timeout: Duration,
        handshake_timeout: Duration,
    ) -> Result<Connection> {
        let connecting = tokio::time::timeout(connect_timeout, TcpStream::connect(addr));
        let stream = match connecting.await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return Err(connect_error(addr, describe_connect_failure(&error))),
            Err(_) => {
                return Err(connect_error(
                    addr,
                    format!("timed out after {connect_timeout:?}"),
                ))
            }
        };
        stream
            .set_nodelay(true)
            .map_err(|error| Error::io(addr, error))?;
        let (mut read_half, mut write_half) = stream.into_split();
        let mut decoder = FrameDecoder::default();
        let handshake = tokio::time::timeout(
            handshake_timeout,
            handshake(
                addr,
                client_id,
                &mut read_half,
                &mut write_half,
                &mut decoder,
            ),
        );
        let info = handshake
            .await
            .map_err(|_| connect_error(addr, HANDSHAKE_UNANSWERED.into()))??;
        Ok(Connection::start(
            addr, client_id, info, read_half, write_half, decoder,
        ))
    }

    fn start(
        addr: &str,
        client_id: &str,
        info: HandshakeInfo,
        read_half: OwnedReadHalf,
        write_half: OwnedWriteHalf,
        decoder: FrameDecoder,
    ) -> Connection {
        let pending = Arc::new(Mutex::new(Pending::default()));
        let (outgoing, outgoing_rx) = mpsc::unbounded_channel();
        // When the reader sees the connection end (EOF, reset), the writer closes
        // its half at once: no socket lingers in CLOSE-WAIT after the broker died.
        let reader_done = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(write_loop(
            addr.to_owned(),
            write_half,
            outgoing_rx,
            pending.clone(),
            reader_done.clone(),
        ));
        let reader = tokio::spawn(read_loop(
            addr.to_owned(),
            read_half,
            decoder,
            pending.clone(),
            reader_done,
        ));
        Connection {
            addr: addr.to_owned(),
            client_id: client_id.to_owned(),
            info,
            next_correlation_id: AtomicU32::new(1),
            pending,
            outgoing,
            reader,
        }
    }

    /// The shard that owns this connection on the broker.
    pub(crate) fn shard(&self) -> u16 {
        self.info.shard
    }

    /// The broker's handshake answer.
    pub(crate) fn info(&self) -> &HandshakeInfo {
        &self.info
    }

    /// The address connected to.
    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    /// `false` once the socket has failed or closed.
    pub(crate) fn is_alive(&self) -> bool {
        self.pending
            .lock()
            .map(|pending| pending.closed.is_none())
            .unwrap_or(false)
    }

    /// Sends a request and waits for its response (or the timeout). A
    /// request-level error in the response becomes `Err`.
    pub(crate) async fn request(
        &self,
        body: &RequestBody,
        payload: Vec<Bytes>,
        timeout: Duration,
    ) -> Result<ResponseBody> {
        let correlation_id = self.next_correlation_id.fetch_add(1, Ordering::Relaxed);
        let (reply, reply_rx) = oneshot::channel();
        self.register(correlation_id, reply)?;
        let guard = PendingGuard {
            pending: &self.pending,
            correlation_id,
        };
        self.enqueue(correlation_id, body, payload)?;
        let outcome = tokio::time::timeout(timeout, reply_rx).await;
        drop(guard);
        match outcome {
            Ok(Ok(response)) => response?.into_result(),
            Ok(Err(_)) => Err(self.closed_error()),
            Err(_) => Err(Error::Timeout(timeout)),
        }
    }

    /// Sends a request that gets no response (produce with acks=0). Resolves once
    /// the frame is written to the socket: until then its payload is still held
    /// (so a producer's buffer bounds what waits for a slow socket).
    pub(crate) async fn send_oneway(&self, body: &RequestBody, payload: Vec<Bytes>) -> Result<()> {
        if !self.is_alive() {
            return Err(self.closed_error());
        }
        let correlation_id = self.next_correlation_id.fetch_add(1, Ordering::Relaxed);
        let (written, written_rx) = oneshot::channel();
        self.enqueue_with(correlation_id, body, payload, Some(written))?;
        match written_rx.await {
            Ok(outcome) => outcome,
            Err(_) => Err(self.closed_error()),
        }
    }

    fn register(&self, correlation_id: u32, reply: Reply) -> Result<()> {
        let mut pending = self.pending.lock().map_err(|_| self.closed_error())?;
        if let Some(reason) = &pending.closed {
            return Err(Error::ConnectionClosed {
                addr: self.addr.clone(),
                reason: reason.clone(),
            });
        }
        pending.waiting.insert(correlation_id, reply);
        Ok(())
    }

    fn enqueue(&self, correlation_id: u32, body: &RequestBody, payload: Vec<Bytes>) -> Result<()> {
        self.enqueue_with(correlation_id, body, payload, None)
    }

    fn enqueue_with(
        &self,
        correlation_id: u32,
        body: &RequestBody,
        payload: Vec<Bytes>,
        written: Option<oneshot::Sender<Result<()>>>,
    ) -> Result<()> {
        let payload_bytes = payload.iter().map(Bytes::len).sum();
        let mut head = BytesMut::with_capacity(256);
        let mut fbb = FlatBufferBuilder::with_capacity(256);
        encode_request_frame(
            &mut head,
            &mut fbb,
            correlation_id,
            &self.client_id,
            body,
            payload_bytes,
        )?;
        let outgoing = Outgoing {
            head: head.freeze(),
            payload,
            written,
        };
        self.outgoing
            .send(outgoing)
            .map_err(|_| self.closed_error())
    }

    fn closed_error(&self) -> Error {
        let reason = self
            .pending
            .lock()
            .ok()
            .and_then(|pending| pending.closed.clone())
            .unwrap_or_else(|| "connection closed".into());
        Error::ConnectionClosed {
            addr: self.addr.clone(),
            reason,
        }
    }
}

/// Removes a request from the pending map if its caller stops waiting (timeout or
/// cancellation), so late responses are dropped and the map does not grow.
struct PendingGuard<'a> {
    pending: &'a Mutex<Pending>,
    correlation_id: u32,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.waiting.remove(&self.correlation_id);
        }
    }
}

/// A connect failure in words a user can act on.
fn describe_connect_failure(error: &std::io::Error) -> String {
    if error.kind() == std::io::ErrorKind::ConnectionRefused {
        "connection refused — is the broker running? (it may still be starting)".into()
    } else {
        error.to_string()
    }
}

fn connect_error(addr: &str, reason: String) -> Error {
    Error::Connect {
        addr: addr.to_owned(),
        reason,
    }
}

async fn handshake(
    addr: &str,
    client_id: &str,
    read_half: &mut OwnedReadHalf,
    write_half: &mut OwnedWriteHalf,
    decoder: &mut FrameDecoder,
) -> Result<HandshakeInfo> {
    let body = RequestBody::Handshake {
        version_min: PROTOCOL_VERSION_MIN,
        version_max: PROTOCOL_VERSION_MAX,
        client_software: Some(concat!("sluice-client/", env!("CARGO_PKG_VERSION")).into()),
    };
    let mut head = BytesMut::new();
    encode_request_frame(
        &mut head,
        &mut FlatBufferBuilder::new(),
        0,
        client_id,
        &body,
        0,
    )?;
    write_half
        .write_all(&head)
        .await
        .map_err(|error| Error::io(addr, error))?;
    let frame = loop {
        if let Some(frame) = decoder.next_frame()? {
            break frame;
        }
        let read = read_half.read_buf(decoder.buffer_mut()).await;
        match read {
            Ok(0) => {
                return Err(connect_error(
                    addr,
                    "broker closed the connection during the handshake".into(),
                ))
            }
            Ok(_) => {}
            Err(error) => return Err(Error::io(addr, error)),
        }
    };
    match decode_response(&frame)?.into_result()? {
        ResponseBody::Handshake(info) => check_handshake(info),
        other => Err(Error::MalformedResponse(format!(
            "expected a handshake response, got {other:?}"
        ))),
    }
}

fn check_handshake(info: HandshakeInfo) -> Result<HandshakeInfo> {
    if !(PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION_MAX).contains(&info.version) {
        return Err(Error::UnsupportedVersion(format!(
            "broker chose version {}",
            info.version
        )));
    }
    if info.shard_count == 0 || info.shard >= info.shard_count {
        return Err(Error::MalformedResponse(format!(
            "handshake names shard {} of {}",
            info.shard, info.shard_count
        )));
    }
    Ok(info)
}

async fn write_loop(
    addr: String,
    mut socket: OwnedWriteHalf,
    mut outgoing: mpsc::UnboundedReceiver<Outgoing>,
    pending: Arc<Mutex<Pending>>,
    reader_done: Arc<tokio::sync::Notify>,
) {
    let mut buffer = BytesMut::with_capacity(WRITE_COALESCE_BYTES_MAX);
    loop {
        let first = tokio::select! {
            message = outgoing.recv() => match message {
                Some(message) => message,
                None => break,
            },
            _ = reader_done.notified() => break,
        };
        let mut next = Some(first);
        let mut result = Ok(());
        // Whom to tell once what is coalesced in `buffer` is written too.
        let mut told_after_write = Vec::new();
        while let Some(mut message) = next.take() {
            let written = message.written.take();
            result = write_message(&mut socket, &mut buffer, message).await;
            told_after_write.extend(written);
            if result.is_err() || buffer.len() >= WRITE_COALESCE_BYTES_MAX {
                break;
            }
            next = outgoing.try_recv().ok();
        }
        if result.is_ok() && !buffer.is_empty() {
            result = socket.write_all(&buffer).await;
            buffer.clear();
        }
        for written in told_after_write {
            let outcome = match &result {
                Ok(()) => Ok(()),
                Err(error) => Err(Error::ConnectionClosed {
                    addr: addr.clone(),
                    reason: format!("write failed: {error}"),
                }),
            };
            let _ = written.send(outcome);
        }
        if let Err(error) = result {
            close(&pending, &addr, format!("write failed: {error}"));
            return;
        }
    }
    let _ = socket.shutdown().await;
}

async fn write_message(
    socket: &mut OwnedWriteHalf,
    buffer: &mut BytesMut,
    message: Outgoing,
) -> std::io::Result<()> {
    buffer.extend_from_slice(&message.head);
    for part in message.payload {
        if part.len() >= WRITE_DIRECT_BYTES_MIN {
            if !buffer.is_empty() {
                socket.write_all(buffer).await?;
                buffer.clear();
            }
            socket.write_all(&part).await?;
        } else {
            buffer.extend_from_slice(&part);
        }
    }
    Ok(())
}

async fn read_loop(
    addr: String,
    mut socket: OwnedReadHalf,
    mut decoder: FrameDecoder,
    pending: Arc<Mutex<Pending>>,
    done: Arc<tokio::sync::Notify>,
) {
    let reason = loop {
        match decoder.next_frame() {
            Ok(Some(frame)) => match decode_response(&frame) {
                Ok(response) => dispatch(&pending, response),
                Err(error) => break format!("undecodable response: {error}"),
            },
            Ok(None) => {
                let buffer = decoder.buffer_mut();
                buffer.reserve(READ_CHUNK_BYTES);
                match socket.read_buf(buffer).await {
                    Ok(0) => break "closed by the broker".to_owned(),
                    Ok(_) => {}
                    Err(error) => break format!("read failed: {error}"),
                }
            }
            Err(error) => break format!("bad framing from the broker: {error}"),
        }
    };
    tracing::debug!(%addr, %reason, "connection closed");
    close(&pending, &addr, reason);
    drop(socket);
    done.notify_one();
}

fn dispatch(pending: &Mutex<Pending>, response: Response) {
    let reply = match pending.lock() {
        Ok(mut pending) => pending.waiting.remove(&response.correlation_id),
        Err(_) => None,
    };
    match reply {
        Some(reply) => {
            let _ = reply.send(Ok(response));
        }
        None => tracing::debug!(
            correlation_id = response.correlation_id,
            "response for a request nobody waits for"
        ),
    }
}

fn close(pending: &Mutex<Pending>, addr: &str, reason: String) {
    let waiting = match pending.lock() {
        Ok(mut pending) => {
            pending.closed.get_or_insert(reason.clone());
            std::mem::take(&mut pending.waiting)
        }
        Err(_) => return,
    };
    for (_, reply) in waiting {
        let _ = reply.send(Err(Error::ConnectionClosed {
            addr: addr.to_owned(),
            reason: reason.clone(),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// acks=0: a send resolves once its frame is written, not when it is
    /// queued, so what waits for a peer that does not read stays bounded by the
    /// producer's buffer (it used to pile up in the connection's queue).
    #[test]
    fn a_oneway_send_resolves_only_once_its_frame_is_written() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let stream = TcpStream::connect(&addr).await.unwrap();
            let (mut peer, _) = listener.accept().await.unwrap();
            let (read_half, write_half) = stream.into_split();
            let info = HandshakeInfo {
                version: PROTOCOL_VERSION_MAX,
                node_id: 1,
                shard: 0,
                shard_count: 1,
                frame_bytes_max: u32::MAX,
                broker_software: None,
            };
            let connection = Connection::start(
                &addr,
                "test",
                info,
                read_half,
                write_half,
                FrameDecoder::default(),
            );
            let body = RequestBody::Produce {
                acks: 0,
                timeout_ms: 1000,
                topics: Vec::new(),
            };
            // Far more than the socket buffers hold while the peer reads nothing.
            let payload = vec![Bytes::from(vec![7u8; 32 << 20])];
            let send = connection.send_oneway(&body, payload);
            tokio::pin!(send);
            let early = tokio::time::timeout(Duration::from_millis(300), &mut send).await;
            assert!(
                early.is_err(),
                "resolved before the frame was written: {early:?}"
            );
            let drain = tokio::spawn(async move {
                let mut sink = vec![0u8; 1 << 20];
                let mut total = 0usize;
                while total < 32 << 20 {
                    match peer.read(&mut sink).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n,
                    }
                }
                total
            });
            tokio::time::timeout(Duration::from_secs(20), &mut send)
                .await
                .expect("resolves once the peer reads")
                .expect("written");
            assert!(drain.await.unwrap() >= 32 << 20);
        });
    }
}
