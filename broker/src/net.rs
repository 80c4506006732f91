//! Listeners and connections. Every shard binds the client port (glommio sets
//! SO_REUSEPORT, so the kernel spreads connections over the shards); a connection
//! lives on the shard that accepted it.
//!
//! A connection reads frames (length checked before allocating), serves up to
//! `INFLIGHT_REQUESTS_PER_CONNECTION_MAX` requests at once (pipelining; responses
//! may go out of order), and writes responses from one writer task. Framing errors
//! close the connection; bad requests get error responses. Idle connections are
//! closed after the idle timeout.

use std::cell::{Cell, RefCell};
use std::collections::{HashSet, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_lite::AsyncWriteExt;
use glommio::net::{TcpListener, TcpStream};
use sluice_schema::wire::{self, ErrorCode};

use crate::api;
use crate::limits::{
    CONNECTION_REQUEST_BYTES_MAX, FRAME_BYTES_MAX, FRAME_BYTES_PER_SECOND_MIN,
    HANDSHAKE_FRAME_BYTES_MAX, INFLIGHT_REQUESTS_PER_CONNECTION_MAX,
};
use crate::protocol::{error_response, Frame, FrameReader, FramingError, Outgoing};
use crate::shard::Shard;
use crate::sync::{Budget, Held, Notify};

/// Small response pieces are coalesced into one write up to this size.
const COALESCE_BYTES: usize = 64 * 1024;
/// How long shutdown waits for in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Live connections of one shard.
#[derive(Default)]
pub struct Connections {
    open: RefCell<HashSet<RawFd>>,
    closed: Notify,
}

impl Connections {
    /// Connections open now.
    pub fn count(&self) -> usize {
        self.open.borrow().len()
    }

    /// Stops reading on every connection: each finishes its in-flight requests,
    /// writes their responses and closes.
    pub fn shut_down_reads(&self) {
        for fd in self.open.borrow().iter() {
            // SAFETY: shutdown(2) on a descriptor this shard holds open; no memory involved.
            unsafe {
                libc::shutdown(*fd, libc::SHUT_RD);
            }
        }
    }

    /// Waits until every connection has closed, or `timeout` passes.
    pub async fn drained(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while self.count() > 0 {
            let now = std::time::Instant::now();
            if now >= deadline {
                tracing::warn!(
                    open = self.count(),
                    "connections still open at the end of shutdown"
                );
                return;
            }
            let _ = glommio::timer::timeout(deadline - now, async {
                self.closed.wait().await;
                Ok(())
            })
            .await;
        }
    }
}

/// Binds a listening socket the way a restarting server needs: SO_REUSEADDR (a
/// restart right after a crash must not fail on the old connections' TIME_WAIT
/// sockets) and SO_REUSEPORT (every shard binds the same port; the kernel spreads
/// connections over them).
pub fn bind_listener(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::os::fd::{FromRawFd, IntoRawFd};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    // SAFETY: the descriptor is a bound, listening TCP socket we own and hand over.
    Ok(unsafe { TcpListener::from_raw_fd(socket.into_raw_fd()) })
}

/// Pending connections the kernel queues per listening socket.
const LISTEN_BACKLOG: i32 = 1024;

/// Accepts connections until shutdown, then drains them.
pub async fn serve(shard: Rc<Shard>, listener: TcpListener) {
    let connections = Rc::new(Connections::default());
    while !shard.shutting_down() {
        let accept = listener.accept();
        futures::pin_mut!(accept);
        let stopping = shard.until_stopping();
        futures::pin_mut!(stopping);
        let accepted = match futures::future::select(accept, stopping).await {
            futures::future::Either::Left((accepted, _)) => accepted,
            futures::future::Either::Right(((), _)) => break,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(shard = %shard.id, %error, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if connections.count() >= shard.settings.connections_max {
            tracing::warn!(shard = %shard.id, limit = shard.settings.connections_max, "connection limit reached; refusing a connection");
            refuse(stream).await;
            continue;
        }
        let fd = stream.as_raw_fd();
        connections.open.borrow_mut().insert(fd);
        {
            use std::sync::atomic::Ordering::Relaxed;
            let metrics = shard.metrics();
            metrics.connections_accepted.fetch_add(1, Relaxed);
            metrics.connections.fetch_add(1, Relaxed);
        }
        let (shard, connections) = (shard.clone(), connections.clone());
        glommio::spawn_local(async move {
            let peer = stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            if let Err(reason) = connection(shard.clone(), stream).await {
                tracing::debug!(shard = %shard.id, %peer, %reason, "connection closed");
            }
            connections.open.borrow_mut().remove(&fd);
            shard
                .metrics()
                .connections
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            connections.closed.notify_all();
        })
        .detach();
    }
    drop(listener);
    connections.shut_down_reads();
    connections.drained(DRAIN_TIMEOUT).await;
}

/// Tells a connection over the limit why it is closed, then closes it.
async fn refuse(mut stream: TcpStream) {
    let response = error_response(
        0,
        ErrorCode::TooManyConnections,
        "the broker's connection limit is reached; try again later",
    );
    let _ = glommio::timer::timeout(Duration::from_millis(100), async {
        stream.write_all(&response.head).await?;
        Ok(())
    })
    .await;
}

/// Responses waiting to be written.
#[derive(Default)]
struct Outbox {
    queue: RefCell<VecDeque<Outgoing>>,
    ready: Notify,
    closing: Cell<bool>,
    inflight: Cell<usize>,
    slot_freed: Notify,
}

impl Outbox {
    fn push(&self, outgoing: Outgoing) {
        self.queue.borrow_mut().push_back(outgoing);
        self.ready.notify_all();
    }
}

async fn connection(shard: Rc<Shard>, stream: TcpStream) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let mut low_water = LowWater::new(stream.as_raw_fd());
    let (mut reader, writer) = futures_lite::io::split(stream);
    let outbox = Rc::new(Outbox::default());
    let writer_task = glommio::spawn_local(write_loop(writer, outbox.clone()));
    let result = read_loop(&shard, &mut reader, &outbox, &mut low_water).await;
    // Finish what is in flight, then let the writer flush and stop.
    while outbox.inflight.get() > 0 {
        outbox.slot_freed.wait().await;
    }
    outbox.closing.set(true);
    outbox.ready.notify_all();
    let _ = writer_task.await;
    result
}

/// Below this many bytes still to come for the frame in progress, the socket
/// wakes the shard for every byte (its default); at or above it, only once that
/// much of the frame has arrived (`SO_RCVLOWAT`), up to the next read's size.
const LOW_WATER_MIN_BYTES: usize = 64 * 1024;

/// A connection's receive low-water mark. A large frame arrives over loopback in
/// pieces of tens of KiB; woken for each, the shard runs its executor loop (timers
/// re-armed, rings flushed) once per piece — about 75 `io_uring_enter` per 1 MiB
/// produce. With the mark at the bytes the frame still needs (at most one
/// read's worth), readiness fires once per read instead. The kernel caps it at
/// half the receive buffer; a peer that stalls mid-frame is still cut off by the
/// frame deadline, and the end of the stream wakes the shard whatever the mark.
struct LowWater {
    fd: RawFd,
    current: usize,
}

impl LowWater {
    fn new(fd: RawFd) -> LowWater {
        LowWater { fd, current: 1 }
    }

    /// Sets the mark for a read of up to `read_bytes` when `remaining` bytes of
    /// the frame in progress are still to come (`None`: no frame length yet).
    fn set(&mut self, remaining: Option<usize>, read_bytes: usize) {
        let want = match remaining {
            Some(remaining) if remaining >= LOW_WATER_MIN_BYTES => remaining.min(read_bytes),
            _ => 1,
        };
        if want == self.current {
            return;
        }
        let value = want.min(i32::MAX as usize) as libc::c_int;
        // SAFETY: setsockopt on the connection's open socket with an int option.
        let result = unsafe {
            libc::setsockopt(
                self.fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if result == 0 {
            self.current = want;
        }
    }
}

async fn read_loop<R: futures_lite::AsyncRead + Unpin>(
    shard: &Rc<Shard>,
    reader: &mut R,
    outbox: &Rc<Outbox>,
    low_water: &mut LowWater,
) -> Result<(), String> {
    let mut frames = FrameReader::new(HANDSHAKE_FRAME_BYTES_MAX);
    // Received bytes count against this connection's and the shard's budgets
    // until their request completes.
    let mut held = Held::empty(vec![
        Budget::new(CONNECTION_REQUEST_BYTES_MAX),
        shard.request_budget.clone(),
    ]);
    let mut frame_started: Option<Instant> = None;
    let mut handshaken = false;
    loop {
        if let Some(mut frame) = frames.try_frame().map_err(|e| e.to_string())? {
            if let Some(started) = frame_started {
                frame.receive_us = started.elapsed().as_micros() as u64;
            }
            let bytes = held.split(frame.wire_bytes);
            frame_started = (frames.buffered() > 0).then(Instant::now);
            if !handshaken {
                handshake_first(shard, &frame, outbox)?;
                handshaken = true;
                frames.set_frame_bytes_max(FRAME_BYTES_MAX);
                continue;
            }
            start_request(shard, outbox, frame, bytes).await;
            continue;
        }
        let deadline = match frame_started {
            Some(started) => started + frame_timeout(shard, frames.declared()),
            None => Instant::now() + shard.settings.idle_timeout,
        };
        low_water.set(
            frames
                .declared()
                .map(|total| total.saturating_sub(frames.buffered())),
            frames.bytes_wanted(),
        );
        match read_more(&mut frames, &mut held, reader, deadline).await {
            ReadOutcome::Read => {
                frame_started.get_or_insert_with(Instant::now);
            }
            ReadOutcome::End if frames.buffered() == 0 => return Ok(()),
            ReadOutcome::End => return Err("the peer closed the connection mid-frame".into()),
            ReadOutcome::Failed(error) => return Err(error),
            ReadOutcome::TimedOut if frame_started.is_some() => {
                return Err(format!(
                    "a frame did not arrive within {} s of its first byte (slow sender)",
                    frame_timeout(shard, frames.declared()).as_secs()
                ));
            }
            ReadOutcome::TimedOut if outbox.inflight.get() == 0 => {
                return Err(format!(
                    "idle for {} s",
                    shard.settings.idle_timeout.as_secs()
                ));
            }
            ReadOutcome::TimedOut => {}
        }
    }
}

/// How long a frame may take from its first byte: the base timeout plus time for
/// its length at the slowest rate allowed.
fn frame_timeout(shard: &Shard, declared: Option<usize>) -> Duration {
    let bytes = declared.unwrap_or(0) as u64;
    shard.settings.frame_timeout + Duration::from_secs(bytes / FRAME_BYTES_PER_SECOND_MIN as u64)
}

enum ReadOutcome {
    Read,
    End,
    TimedOut,
    Failed(String),
}

/// Reads the next piece of the frame in progress, holding budget for it first;
/// gives up at `deadline`. Cancellation-safe on both awaits.
async fn read_more<R: futures_lite::AsyncRead + Unpin>(
    frames: &mut FrameReader,
    held: &mut Held,
    reader: &mut R,
    deadline: Instant,
) -> ReadOutcome {
    let wanted = frames.bytes_wanted();
    let remaining = deadline.saturating_duration_since(Instant::now());
    let outcome = glommio::timer::timeout(remaining, async {
        held.grow(wanted).await;
        frames
            .fill(reader, wanted)
            .await
            .map_err(|e| glommio::GlommioError::IoError(framing_to_io(e)))
    })
    .await;
    // Budget is held for the bytes buffered (what was read), not for what was
    // asked; this also undoes a grow whose read was cancelled.
    held.shrink(held.bytes().saturating_sub(frames.buffered()));
    match outcome {
        Ok(0) => ReadOutcome::End,
        Ok(_) => ReadOutcome::Read,
        Err(glommio::GlommioError::TimedOut(_)) => ReadOutcome::TimedOut,
        Err(error) => ReadOutcome::Failed(error.to_string()),
    }
}

/// The first frame must be a handshake; anything else is answered and closes.
fn handshake_first(shard: &Rc<Shard>, frame: &Frame, outbox: &Outbox) -> Result<(), String> {
    match handshake(shard, &frame.envelope) {
        Ok(response) => {
            outbox.push(response);
            Ok(())
        }
        Err(response) => {
            outbox.push(response);
            Err("first request was not a handshake".into())
        }
    }
}

/// Serves a request in its own task once the connection has a pipelining slot;
/// `bytes` (its share of the budgets) is given back when it completes.
async fn start_request(shard: &Rc<Shard>, outbox: &Rc<Outbox>, frame: Frame, bytes: Held) {
    while outbox.inflight.get() >= INFLIGHT_REQUESTS_PER_CONNECTION_MAX {
        outbox.slot_freed.wait().await;
    }
    outbox.inflight.set(outbox.inflight.get() + 1);
    let (shard, outbox) = (shard.clone(), outbox.clone());
    glommio::spawn_local(async move {
        let response = api::dispatch(&shard, frame).await;
        drop(bytes);
        if let Some(response) = response {
            outbox.push(response);
        }
        outbox.inflight.set(outbox.inflight.get() - 1);
        outbox.slot_freed.notify_all();
    })
    .detach();
}

fn framing_to_io(error: FramingError) -> std::io::Error {
    match error {
        FramingError::Io(error) => error,
        other => std::io::Error::new(std::io::ErrorKind::InvalidData, other.to_string()),
    }
}

/// The first request must be a Handshake; anything else gets HandshakeRequired.
fn handshake(shard: &Rc<Shard>, envelope: &[u8]) -> Result<Outgoing, Outgoing> {
    let request =
        api::parse(envelope).map_err(|m| error_response(0, ErrorCode::MalformedRequest, &m))?;
    match request.body_as_handshake_request() {
        Some(handshake) if request.body_type() == wire::RequestBody::HandshakeRequest => {
            let response = api::handshake_response(shard, request.correlation_id(), handshake);
            Ok(response)
        }
        _ => Err(error_response(
            request.correlation_id(),
            ErrorCode::HandshakeRequired,
            "the first request on a connection must be a Handshake",
        )),
    }
}

async fn write_loop<W: futures_lite::AsyncWrite + Unpin>(mut writer: W, outbox: Rc<Outbox>) {
    let mut pending = BytesMut::with_capacity(COALESCE_BYTES);
    loop {
        let wake = outbox.ready.wait();
        let batch: Vec<Outgoing> = outbox.queue.borrow_mut().drain(..).collect();
        if batch.is_empty() {
            if outbox.closing.get() {
                let _ = writer.close().await;
                return;
            }
            wake.await;
            continue;
        }
        for outgoing in batch {
            for piece in std::iter::once(&outgoing.head).chain(outgoing.payload.iter()) {
                if piece.len() >= COALESCE_BYTES {
                    if write(&mut writer, &mut pending).await.is_err()
                        || writer.write_all(piece).await.is_err()
                    {
                        return;
                    }
                } else {
                    if pending.len() + piece.len() > COALESCE_BYTES
                        && write(&mut writer, &mut pending).await.is_err()
                    {
                        return;
                    }
                    pending.extend_from_slice(piece);
                }
            }
        }
        if write(&mut writer, &mut pending).await.is_err() {
            return;
        }
    }
}

async fn write<W: futures_lite::AsyncWrite + Unpin>(
    writer: &mut W,
    pending: &mut BytesMut,
) -> std::io::Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let result = writer.write_all(pending).await;
    pending.clear();
    result
}
