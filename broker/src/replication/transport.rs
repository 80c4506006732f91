//! Node-to-node transport: Raft messages and leadership gossip on the peer port.
//!
//! Every shard of every node keeps one outgoing connection to each other node,
//! dialled on first use and redialled after a failure; what is queued while a peer
//! is unreachable is dropped (Raft resends). Messages a shard sends between two
//! flushes go out in one frame (`peer.fbs`): a `RaftBatch` whose slices address
//! the protobuf-encoded messages in the payload, so batches inside them are copied
//! once, into the socket buffer. The receiving node reads frames on whichever
//! shard accepted the connection and hands each message to the shard that owns
//! its group (over the mesh when that is another shard).
//!
//! Connections are one-way: the dialler writes, the acceptor reads. The first
//! frame is a `Hello` with the sender's id, its view of the peer list (nodes with
//! another view are refused: a misconfigured cluster must not half-work) and its
//! client address (for Metadata answers).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use flatbuffers::FlatBufferBuilder;
use futures_lite::AsyncWriteExt;
use glommio::net::{TcpListener, TcpStream};
use protobuf::Message as _;
use raft::eraftpb::Message;
use sluice_schema::peer;

use super::host::Outbound;
use crate::cluster::{ClusterView, LeaderInfo, NodeAddress};
use crate::partition::replica::GroupId;
use crate::protocol::FrameReader;
use crate::sync::Notify;
use crate::types::NodeId;

/// Bytes queued for one peer at most; beyond, messages are dropped (Raft resends).
pub const PEER_QUEUE_BYTES_MAX: usize = 64 << 20;
/// One frame carries at most this many payload bytes.
pub const PEER_FRAME_PAYLOAD_MAX: usize = 8 << 20;
/// Largest frame accepted from a peer.
pub const PEER_FRAME_BYTES_MAX: usize = 2 * PEER_FRAME_PAYLOAD_MAX + (1 << 20);
/// How long dialling a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Wait between attempts to reach a peer that is down.
const REDIAL_WAIT: Duration = Duration::from_millis(200);

/// Messages waiting for one peer.
#[derive(Default)]
struct Pending {
    payload: Vec<u8>,
    slices: Vec<peer::RaftSlice>,
    hints: Vec<peer::LeaderHint>,
}

/// One shard's link to one peer.
struct Link {
    node: NodeId,
    address: String,
    pending: RefCell<Pending>,
    wake: Notify,
    dropped: Cell<u64>,
}

/// A shard's connections to the other nodes.
pub struct PeerTransport {
    view: Arc<ClusterView>,
    links: HashMap<NodeId, Rc<Link>>,
    hello: Bytes,
    closing: Rc<Cell<bool>>,
}

impl PeerTransport {
    /// Links to every other node of the view; starts their writer tasks.
    pub fn start(view: Arc<ClusterView>, own: &NodeAddress) -> Rc<PeerTransport> {
        let node = view.config.node;
        let links: HashMap<NodeId, Rc<Link>> = view
            .config
            .peers
            .iter()
            .filter(|(id, _)| **id != node)
            .map(|(id, address)| {
                let link = Rc::new(Link {
                    node: *id,
                    address: address.clone(),
                    pending: RefCell::new(Pending::default()),
                    wake: Notify::default(),
                    dropped: Cell::new(0),
                });
                (*id, link)
            })
            .collect();
        let hello = hello_frame(node, &view.config.peers_string(), own);
        let transport = Rc::new(PeerTransport {
            view,
            links,
            hello,
            closing: Rc::new(Cell::new(false)),
        });
        for link in transport.links.values() {
            glommio::spawn_local(write_loop(
                link.clone(),
                transport.hello.clone(),
                node,
                transport.closing.clone(),
            ))
            .detach();
        }
        transport
    }

    /// Sends leadership hints to every peer.
    pub fn gossip(&self, hints: &[(GroupId, LeaderInfo)]) {
        for link in self.links.values() {
            let mut pending = link.pending.borrow_mut();
            for (group, info) in hints {
                let shard = &info.shard;
                pending.hints.push(peer::LeaderHint::new(
                    group.0,
                    info.term,
                    info.high_watermark,
                    info.log_start,
                    info.leader.map_or(0, |n| n.0),
                    info.in_sync,
                    info.voters,
                    info.in_sync_mask,
                    *shard,
                ));
            }
            drop(pending);
            link.wake.notify_all();
        }
    }

    /// Stops the writers.
    pub fn close(&self) {
        self.closing.set(true);
        for link in self.links.values() {
            link.wake.notify_all();
        }
    }

    /// The view.
    pub fn view(&self) -> &Arc<ClusterView> {
        &self.view
    }
}

impl Outbound for PeerTransport {
    fn send(&self, to: NodeId, group: GroupId, message: &Message) {
        let Some(link) = self.links.get(&to) else {
            return;
        };
        let mut pending = link.pending.borrow_mut();
        if pending.payload.len() >= PEER_QUEUE_BYTES_MAX {
            link.dropped.set(link.dropped.get() + 1);
            tracing::debug!(%to, dropped = link.dropped.get(), "peer queue full: a Raft message is dropped");
            return;
        }
        let offset = pending.payload.len();
        if message.write_to_vec(&mut pending.payload).is_err() {
            pending.payload.truncate(offset);
            return;
        }
        let bytes = (pending.payload.len() - offset) as u32;
        pending
            .slices
            .push(peer::RaftSlice::new(group.0, offset as u32, bytes));
        drop(pending);
        link.wake.notify_all();
    }
}

fn hello_frame(node: NodeId, peers: &str, own: &NodeAddress) -> Bytes {
    let mut fbb = FlatBufferBuilder::with_capacity(256);
    let peers = fbb.create_string(peers);
    let host = fbb.create_string(&own.host);
    let hello = peer::Hello::create(
        &mut fbb,
        &peer::HelloArgs {
            node_id: node.0,
            peers: Some(peers),
            client_host: Some(host),
            client_port: own.port,
            shard_count: own.shard_count,
            protocol_version: sluice_schema::PEER_PROTOCOL_VERSION,
        },
    );
    finish(
        fbb,
        node,
        peer::PeerBody::Hello,
        hello.as_union_value(),
        &[],
    )
}

fn finish(
    mut fbb: FlatBufferBuilder<'_>,
    node: NodeId,
    kind: peer::PeerBody,
    body: flatbuffers::WIPOffset<flatbuffers::UnionWIPOffset>,
    payload: &[u8],
) -> Bytes {
    let frame = peer::PeerFrame::create(
        &mut fbb,
        &peer::PeerFrameArgs {
            from_node: node.0,
            body_type: kind,
            body: Some(body),
        },
    );
    fbb.finish(frame, None);
    let envelope = fbb.finished_data();
    let mut out = BytesMut::with_capacity(8 + envelope.len() + payload.len());
    out.put_u32_le((4 + envelope.len() + payload.len()) as u32);
    out.put_u32_le(envelope.len() as u32);
    out.put_slice(envelope);
    out.put_slice(payload);
    out.freeze()
}

/// Takes what is queued for a link as frames of at most `PEER_FRAME_PAYLOAD_MAX`.
fn take_frames(link: &Link, node: NodeId) -> Vec<Bytes> {
    let pending = std::mem::take(&mut *link.pending.borrow_mut());
    let mut frames = Vec::new();
    if !pending.hints.is_empty() {
        let mut fbb = FlatBufferBuilder::with_capacity(64 + 64 * pending.hints.len());
        let hints = fbb.create_vector(&pending.hints);
        let body =
            peer::LeaderHints::create(&mut fbb, &peer::LeaderHintsArgs { hints: Some(hints) });
        frames.push(finish(
            fbb,
            node,
            peer::PeerBody::LeaderHints,
            body.as_union_value(),
            &[],
        ));
    }
    let mut start = 0usize;
    while start < pending.slices.len() {
        let base = pending.slices[start].offset() as usize;
        let mut end = start;
        let mut bytes = 0usize;
        while end < pending.slices.len()
            && (end == start
                || bytes + pending.slices[end].bytes() as usize <= PEER_FRAME_PAYLOAD_MAX)
        {
            bytes += pending.slices[end].bytes() as usize;
            end += 1;
        }
        let slices: Vec<peer::RaftSlice> = pending.slices[start..end]
            .iter()
            .map(|s| peer::RaftSlice::new(s.group(), s.offset() - base as u32, s.bytes()))
            .collect();
        let mut fbb = FlatBufferBuilder::with_capacity(64 + 24 * slices.len());
        let messages = fbb.create_vector(&slices);
        let body = peer::RaftBatch::create(
            &mut fbb,
            &peer::RaftBatchArgs {
                messages: Some(messages),
            },
        );
        frames.push(finish(
            fbb,
            node,
            peer::PeerBody::RaftBatch,
            body.as_union_value(),
            &pending.payload[base..base + bytes],
        ));
        start = end;
    }
    frames
}

fn resolve(address: &str) -> Option<SocketAddr> {
    address.to_socket_addrs().ok()?.next()
}

async fn write_loop(link: Rc<Link>, hello: Bytes, node: NodeId, closing: Rc<Cell<bool>>) {
    let mut stream: Option<TcpStream> = None;
    while !closing.get() {
        let empty = {
            let pending = link.pending.borrow();
            pending.slices.is_empty() && pending.hints.is_empty()
        };
        if empty {
            link.wake.wait().await;
            continue;
        }
        if stream.is_none() {
            stream = dial(&link, &hello).await;
            if stream.is_none() {
                // Unreachable: what waits is stale by the time it would arrive.
                *link.pending.borrow_mut() = Pending::default();
                glommio::timer::sleep(REDIAL_WAIT).await;
                continue;
            }
        }
        let frames = take_frames(&link, node);
        let Some(connection) = stream.as_mut() else {
            continue;
        };
        for frame in frames {
            if let Err(error) = connection.write_all(&frame).await {
                tracing::debug!(peer = %link.node, %error, "peer connection lost");
                stream = None;
                break;
            }
        }
    }
}

async fn dial(link: &Link, hello: &Bytes) -> Option<TcpStream> {
    let address = resolve(&link.address)?;
    let mut stream = TcpStream::connect_timeout(address, CONNECT_TIMEOUT)
        .await
        .ok()?;
    let _ = stream.set_nodelay(true);
    stream.write_all(hello).await.ok()?;
    tracing::debug!(peer = %link.node, address = %link.address, "connected to peer");
    Some(stream)
}

/// Where received messages go.
pub trait Inbound {
    /// Raft messages for groups, decoded from one frame.
    fn raft(&self, messages: Vec<(GroupId, Message)>);
}

/// Accepts peer connections on one shard until `closing`.
pub async fn serve_peers(
    listener: TcpListener,
    view: Arc<ClusterView>,
    inbound: Rc<dyn Inbound>,
    closing: impl Fn() -> bool + 'static,
) {
    let closing = Rc::new(closing);
    while !closing() {
        let accepted = glommio::timer::timeout(Duration::from_millis(100), async {
            listener.accept().await
        })
        .await;
        let Ok(stream) = accepted else {
            continue;
        };
        let (view, inbound, closing) = (view.clone(), inbound.clone(), closing.clone());
        glommio::spawn_local(async move {
            if let Err(reason) = read_peer(stream, &view, &*inbound, &*closing).await {
                tracing::debug!(%reason, "peer connection closed");
            }
        })
        .detach();
    }
}

async fn read_peer(
    mut stream: TcpStream,
    view: &ClusterView,
    inbound: &dyn Inbound,
    closing: &dyn Fn() -> bool,
) -> Result<(), String> {
    let mut frames = FrameReader::new(PEER_FRAME_BYTES_MAX);
    let mut from: Option<NodeId> = None;
    while !closing() {
        let frame = loop {
            if let Some(frame) = frames.try_frame().map_err(|e| e.to_string())? {
                break frame;
            }
            let wanted = frames.bytes_wanted();
            let read = glommio::timer::timeout(Duration::from_millis(500), async {
                frames.fill(&mut stream, wanted).await.map_err(|e| {
                    glommio::GlommioError::IoError(std::io::Error::other(e.to_string()))
                })
            })
            .await;
            match read {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(glommio::GlommioError::TimedOut(_)) => {
                    if closing() {
                        return Ok(());
                    }
                }
                Err(error) => return Err(error.to_string()),
            }
        };
        let envelope = flatbuffers::root::<peer::PeerFrame>(&frame.envelope)
            .map_err(|e| format!("malformed peer frame: {e}"))?;
        match (from, envelope.body_type()) {
            (None, peer::PeerBody::Hello) => {
                let hello = envelope.body_as_hello().ok_or("Hello without a body")?;
                from = Some(check_hello(view, &hello)?);
            }
            (None, _) => return Err("a peer must say Hello first".into()),
            (Some(node), peer::PeerBody::RaftBatch) => {
                view.node_seen(node, None);
                let batch = envelope
                    .body_as_raft_batch()
                    .ok_or("RaftBatch without a body")?;
                let mut messages = Vec::new();
                for slice in batch.messages().iter().flatten() {
                    let start = slice.offset() as usize;
                    let end = start + slice.bytes() as usize;
                    let Some(bytes) =
                        (end <= frame.payload.len()).then(|| frame.payload.slice(start..end))
                    else {
                        return Err("a Raft message slice runs past the frame".into());
                    };
                    let message =
                        <Message as protobuf::Message>::parse_from_carllerche_bytes(&bytes)
                            .map_err(|e| format!("malformed Raft message: {e}"))?;
                    if message.from != u64::from(node.0) {
                        return Err(format!("node {node} sent a message from {}", message.from));
                    }
                    messages.push((GroupId(slice.group()), message));
                }
                inbound.raft(messages);
            }
            (Some(node), peer::PeerBody::LeaderHints) => {
                view.node_seen(node, None);
                let hints = envelope
                    .body_as_leader_hints()
                    .ok_or("LeaderHints without a body")?;
                for hint in hints.hints().iter().flatten() {
                    view.hint(
                        GroupId(hint.group()),
                        LeaderInfo {
                            leader: (hint.leader() != 0).then_some(NodeId(hint.leader())),
                            term: hint.term(),
                            high_watermark: hint.high_watermark(),
                            log_start: hint.log_start(),
                            in_sync: hint.in_sync(),
                            in_sync_mask: hint.in_sync_mask(),
                            voters: hint.voters(),
                            shard: hint.shard(),
                        },
                    );
                }
            }
            (Some(_), other) => return Err(format!("unexpected peer frame kind {}", other.0)),
        }
    }
    Ok(())
}

fn check_hello(view: &ClusterView, hello: &peer::Hello<'_>) -> Result<NodeId, String> {
    let node = NodeId(hello.node_id());
    if node == view.config.node || !view.config.peers.contains_key(&node) {
        return Err(format!(
            "a peer says it is node {node}, which is not another node of this cluster"
        ));
    }
    let ours = view.config.peers_string();
    let theirs = hello.peers().unwrap_or_default();
    if theirs != ours {
        tracing::error!(peer = %node, ours = %ours, theirs = %theirs, "a peer was started with another --peers list; refusing it (start every node with the same list)");
        return Err("peer lists differ".into());
    }
    view.node_seen(
        node,
        Some(NodeAddress {
            host: hello.client_host().unwrap_or_default().to_string(),
            port: hello.client_port(),
            shard_count: hello.shard_count(),
        }),
    );
    Ok(node)
}
