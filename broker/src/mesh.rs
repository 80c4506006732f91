//! Cross-shard request/reply lanes.
//!
//! Two full meshes of bounded glommio channels: one carries requests, the other
//! replies, so a shard draining replies is never stuck behind requests (glommio
//! issue #555: a single small full mesh can deadlock). The task that drains a
//! shard's request inbox never sends on the request mesh itself: each request is
//! handled in its own task, which sends its reply on the reply mesh. A request
//! names the reply-mesh peer to answer, so the two meshes need not agree on peer
//! numbering; a shard's id is its peer id on the request mesh.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::rc::Rc;

use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};

use crate::limits::{MESH_CHANNEL_CAPACITY, MESH_SERVE_TASKS_MAX};
use crate::shard_messages::{ShardReply, ShardRequest};
use crate::sync::Completion;

/// A request crossing shards.
pub struct MeshRequest {
    id: u64,
    reply_to: usize,
    body: ShardRequest,
}

/// A reply crossing shards.
pub struct MeshReply {
    id: u64,
    body: ShardReply,
}

/// The builders every shard joins at start-up (cloned into each executor).
#[derive(Clone)]
pub struct MeshBuilders {
    requests: MeshBuilder<MeshRequest, Full>,
    replies: MeshBuilder<MeshReply, Full>,
}

impl MeshBuilders {
    /// Meshes for `shards` shards.
    pub fn new(shards: usize) -> Self {
        MeshBuilders {
            requests: MeshBuilder::full(shards, MESH_CHANNEL_CAPACITY),
            replies: MeshBuilder::full(shards, MESH_CHANNEL_CAPACITY),
        }
    }
}

/// One shard's end of the meshes.
pub struct Mesh {
    requests: Senders<MeshRequest>,
    replies: Senders<MeshReply>,
    pending: RefCell<HashMap<u64, Rc<Completion<ShardReply>>>>,
    next_id: Cell<u64>,
    shard_count: usize,
}

impl Mesh {
    /// Joins both meshes (waits for every shard), starts the reply drain, and
    /// returns the mesh plus the request inbox to serve with [`Mesh::serve`].
    pub async fn join(builders: MeshBuilders) -> Result<(Rc<Mesh>, Inbox), String> {
        let (requests, request_receivers) = builders
            .requests
            .join()
            .await
            .map_err(|_| "cannot join the request mesh")?;
        let (replies, mut reply_receivers) = builders
            .replies
            .join()
            .await
            .map_err(|_| "cannot join the reply mesh")?;
        let shard_count = requests.nr_consumers();
        let mesh = Rc::new(Mesh {
            requests,
            replies,
            pending: RefCell::new(HashMap::new()),
            next_id: Cell::new(1),
            shard_count,
        });
        for (_, receiver) in reply_receivers.streams() {
            let mesh = mesh.clone();
            glommio::spawn_local(async move {
                while let Some(reply) = receiver.recv().await {
                    let waiter = mesh.pending.borrow_mut().remove(&reply.id);
                    if let Some(waiter) = waiter {
                        waiter.complete(reply.body);
                    }
                }
            })
            .detach();
        }
        Ok((
            mesh,
            Inbox {
                receivers: request_receivers,
            },
        ))
    }

    /// This shard's index.
    pub fn shard_index(&self) -> usize {
        self.requests.peer_id()
    }

    /// Shards in the node.
    pub fn shard_count(&self) -> usize {
        self.shard_count
    }

    /// Sends `body` to shard `target` (never this shard) and waits for its reply.
    pub async fn call(&self, target: usize, body: ShardRequest) -> ShardReply {
        debug_assert_ne!(target, self.shard_index(), "local work is done locally");
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let waiter = Completion::new();
        self.pending.borrow_mut().insert(id, waiter.clone());
        let request = MeshRequest {
            id,
            reply_to: self.replies.peer_id(),
            body,
        };
        if self.requests.send_to(target, request).await.is_err() {
            self.pending.borrow_mut().remove(&id);
            return ShardReply::Unavailable(format!("shard {target} is not reachable"));
        }
        waiter.wait().await
    }
}

/// A shard's request inbox.
pub struct Inbox {
    receivers: glommio::channels::channel_mesh::Receivers<MeshRequest>,
}

impl Mesh {
    /// Serves requests from every peer: each in its own task, replying on the
    /// reply mesh. `handler` runs the request on this shard.
    ///
    /// At most `MESH_SERVE_TASKS_MAX` requests are served at once: beyond that the
    /// drain stops taking requests, the bounded lanes fill, and senders wait
    /// (backpressure reaches the connection that caused the load). Long-poll waits
    /// are exempt — they hold a slot for up to a minute and would starve the rest —
    /// and are bounded at their source instead (`FETCH_WAITS_PER_SHARD_MAX` per
    /// shard). Handlers served here only ever call leaf requests on other shards
    /// (the controller's CreateLogs/DeleteLogs), so the slots cannot deadlock.
    pub fn serve<H, F>(self: &Rc<Self>, mut inbox: Inbox, handler: H)
    where
        H: Fn(ShardRequest) -> F + Clone + 'static,
        F: Future<Output = ShardReply> + 'static,
    {
        let slots = Rc::new(glommio::sync::Semaphore::new(MESH_SERVE_TASKS_MAX as u64));
        for (_, receiver) in inbox.receivers.streams() {
            let mesh = self.clone();
            let handler = handler.clone();
            let slots = slots.clone();
            glommio::spawn_local(async move {
                while let Some(request) = receiver.recv().await {
                    let slot = if request.body.is_long_poll() {
                        None
                    } else {
                        match slots.acquire_static_permit(1).await {
                            Ok(permit) => Some(permit),
                            Err(_) => return,
                        }
                    };
                    let mesh = mesh.clone();
                    let handler = handler.clone();
                    glommio::spawn_local(async move {
                        let _slot = slot;
                        let body = handler(request.body).await;
                        let _ = mesh
                            .replies
                            .send_to(
                                request.reply_to,
                                MeshReply {
                                    id: request.id,
                                    body,
                                },
                            )
                            .await;
                    })
                    .detach();
                }
            })
            .detach();
        }
    }
}
