//! [`Client`]: bootstrap, shard-aware connections, metadata cache and the admin
//! requests.
//!
//! The broker runs one shard per core and every shard accepts connections on the
//! same port (SO_REUSEPORT spreads them by hash), so after the first handshake
//! tells the shard count, the client opens more connections until it holds one per
//! shard (at most [`SHARD_CONNECT_ATTEMPTS_PER_SHARD`] × shards attempts). A
//! partition request then goes to the connection of the partition's owning shard
//! and skips the broker's cross-shard hop; if that shard has no connection, any
//! connection works (the broker forwards).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sluice_schema::DEFAULT_PORT;

use crate::connection::Connection;
use crate::error::{check_code, Code, Error, Result};
use crate::request::{ListOffsetsSpec, NewTopic, OffsetQuery, RequestBody};
use crate::response::{Metadata, ResponseBody, TopicDescription, TopicResult, TopicSummary};

/// A request to a partition's leader is tried this many times while leadership
/// moves (each after refreshing metadata): 10 s in all. An election plus the new
/// leader's first commit can take more than 2 s on a loaded machine (seen: a
/// ListOffsets gave up with LeaderNotAvailable while 7 three-node clusters
/// shared 2 cores).
pub const LEADER_RETRIES: u32 = 100;
/// Wait between those tries.
pub const LEADER_RETRY_WAIT: Duration = Duration::from_millis(100);

/// Connection attempts per shard when filling the per-shard connection set.
pub const SHARD_CONNECT_ATTEMPTS_PER_SHARD: usize = 4;

/// Client settings.
#[derive(Debug, Clone)]
#[must_use]
pub struct ClientConfig {
    /// Bootstrap brokers, `host:port` (port defaults to 9440).
    pub brokers: Vec<String>,
    /// Sent in every request envelope.
    pub client_id: String,
    /// How long a request may wait for its response.
    pub request_timeout: Duration,
    /// How long connecting plus handshaking may take.
    pub connect_timeout: Duration,
    /// Open one connection per broker shard and route by partition owner.
    pub shard_aware: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            brokers: vec![format!("127.0.0.1:{DEFAULT_PORT}")],
            client_id: "sluice-client".into(),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            shard_aware: true,
        }
    }
}

impl ClientConfig {
    /// Defaults with the given bootstrap brokers.
    pub fn new<I, S>(brokers: I) -> ClientConfig
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientConfig {
            brokers: brokers.into_iter().map(Into::into).collect(),
            ..ClientConfig::default()
        }
    }
}

/// Where a partition's requests go: its leader node and the shard there that
/// owns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Target {
    /// Leader node id.
    pub node: u32,
    /// Owning shard on that node.
    pub shard: u16,
}

/// Where each partition of a topic lives (from Metadata).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRoute {
    /// Topic name.
    pub name: Arc<str>,
    /// Owning shard of each partition (on its leader), indexed by partition.
    pub shards: Vec<u16>,
    /// Leader node of each partition (0: unknown, an election is in progress).
    pub leaders: Vec<u32>,
}

impl TopicRoute {
    /// Number of partitions.
    pub fn partition_count(&self) -> u32 {
        self.shards.len() as u32
    }

    /// Owning shard of `partition`.
    pub fn shard(&self, partition: u32) -> Option<u16> {
        self.shards.get(partition as usize).copied()
    }

    /// Leader node and shard of `partition`; `None` when the partition does not
    /// exist or has no known leader.
    pub fn target(&self, partition: u32) -> Option<Target> {
        let node = *self.leaders.get(partition as usize)?;
        let shard = self.shard(partition)?;
        (node != 0).then_some(Target { node, shard })
    }
}

/// An offset lookup result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListedOffset {
    /// The offset found.
    pub offset: u64,
    /// Max timestamp of the batch found (timestamp lookups), else -1.
    pub timestamp_ms: i64,
    /// First offset in the log.
    pub log_start_offset: u64,
    /// Offset of the next record.
    pub high_watermark: u64,
}

/// A connected client; cheap to clone (shared state).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("brokers", &self.inner.config.brokers)
            .finish()
    }
}

struct Inner {
    config: ClientConfig,
    /// Per node: its address and one connection per shard (when shard-aware).
    nodes: Mutex<HashMap<u32, NodeConnections>>,
    /// The node the client bootstrapped on (admin requests go there).
    home: Mutex<Option<u32>>,
    /// Client addresses of nodes, from Metadata.
    addresses: Mutex<HashMap<u32, String>>,
    routes: Mutex<HashMap<String, Arc<TopicRoute>>>,
    reconnecting: tokio::sync::Mutex<()>,
}

/// One node's connections.
#[derive(Default)]
struct NodeConnections {
    addr: String,
    slots: Vec<Option<Arc<Connection>>>,
}

impl NodeConnections {
    fn live(&self, shard: u16) -> Option<Arc<Connection>> {
        self.slots
            .get(usize::from(shard))
            .cloned()
            .flatten()
            .filter(|c| c.is_alive())
    }

    fn any_live(&self) -> Option<Arc<Connection>> {
        self.slots.iter().flatten().find(|c| c.is_alive()).cloned()
    }

    fn missing(&self) -> usize {
        self.slots
            .iter()
            .filter(|slot| !slot.as_ref().is_some_and(|c| c.is_alive()))
            .count()
    }
}

impl Client {
    /// Connects to the first reachable bootstrap broker and opens per-shard
    /// connections.
    pub async fn connect(config: ClientConfig) -> Result<Client> {
        if config.brokers.is_empty() {
            return Err(Error::InvalidArgument("no brokers given".into()));
        }
        let inner = Arc::new(Inner {
            config,
            nodes: Mutex::new(HashMap::new()),
            home: Mutex::new(None),
            addresses: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
            reconnecting: tokio::sync::Mutex::new(()),
        });
        let client = Client { inner };
        client.reconnect_home().await?;
        Ok(client)
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    pub(crate) fn home(&self) -> Option<u32> {
        *self
            .inner
            .home
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Shards of the node the client bootstrapped on (1 before anything is known).
    pub fn shard_count(&self) -> u16 {
        let home = self.home();
        let nodes = self.lock_nodes();
        home.and_then(|node| nodes.get(&node))
            .map_or(1, |n| n.slots.len().max(1) as u16)
    }

    /// Shards of the bootstrap node that currently have their own live connection.
    pub fn connected_shards(&self) -> Vec<u16> {
        let home = self.home();
        let nodes = self.lock_nodes();
        let Some(node) = home.and_then(|node| nodes.get(&node)) else {
            return Vec::new();
        };
        (0..node.slots.len() as u16)
            .filter(|shard| node.live(*shard).is_some())
            .collect()
    }

    fn lock_nodes(&self) -> std::sync::MutexGuard<'_, HashMap<u32, NodeConnections>> {
        self.inner
            .nodes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_routes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<TopicRoute>>> {
        self.inner
            .routes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_addresses(&self) -> std::sync::MutexGuard<'_, HashMap<u32, String>> {
        self.inner
            .addresses
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes sure some node has a live connection to send admin requests to: the
    /// bootstrap node while it answers, else the next reachable broker.
    async fn reconnect_home(&self) -> Result<()> {
        let _serialized = self.inner.reconnecting.lock().await;
        if let Some(node) = self.home() {
            if self
                .lock_nodes()
                .get(&node)
                .and_then(NodeConnections::any_live)
                .is_some()
            {
                return Ok(());
            }
        }
        let first = self.connect_any().await?;
        let node = first.info().node_id;
        let addr = first.addr().to_owned();
        self.adopt(node, &addr, first);
        *self
            .inner
            .home
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(node);
        if self.inner.config.shard_aware {
            self.fill_shards(node, &addr).await;
        }
        Ok(())
    }

    /// Puts a fresh connection into its node's slot for its shard.
    fn adopt(&self, node: u32, addr: &str, connection: Connection) {
        let shard_count = usize::from(connection.info().shard_count.max(1));
        let shard = usize::from(connection.shard());
        let mut nodes = self.lock_nodes();
        let entry = nodes.entry(node).or_default();
        entry.addr = addr.to_owned();
        if entry.slots.len() != shard_count {
            entry.slots.resize(shard_count, None);
        }
        if let Some(slot) = entry.slots.get_mut(shard) {
            if !slot.as_ref().is_some_and(|c| c.is_alive()) {
                *slot = Some(Arc::new(connection));
            }
        }
    }

    async fn connect_any(&self) -> Result<Connection> {
        let config = &self.inner.config;
        let mut candidates: Vec<String> = config
            .brokers
            .iter()
            .map(|b| with_default_port(b))
            .collect();
        for addr in self.lock_addresses().values() {
            if !candidates.contains(addr) {
                candidates.push(addr.clone());
            }
        }
        let mut failures = Vec::new();
        for addr in candidates {
            match Connection::open(&addr, &config.client_id, config.connect_timeout).await {
                Ok(connection) => return Ok(connection),
                Err(Error::Connect { reason, .. }) => failures.push(format!("{addr}: {reason}")),
                Err(error) => failures.push(format!("{addr}: {error}")),
            }
        }
        let reason = match failures.as_slice() {
            [single] => single
                .split_once(": ")
                .map_or(single.clone(), |(_, reason)| reason.to_owned()),
            _ => failures.join("; "),
        };
        Err(Error::Connect {
            addr: config.brokers.join(","),
            reason,
        })
    }

    fn missing_shards(&self, node: u32) -> usize {
        self.lock_nodes()
            .get(&node)
            .map_or(1, NodeConnections::missing)
    }

    /// Opens connections to `node` until every shard has one (bounded attempts:
    /// the kernel, not the client, picks the shard of each connection).
    async fn fill_shards(&self, node: u32, addr: &str) {
        let config = &self.inner.config;
        let shard_count = self
            .lock_nodes()
            .get(&node)
            .map_or(1, |n| n.slots.len().max(1));
        let attempts = SHARD_CONNECT_ATTEMPTS_PER_SHARD * shard_count;
        for _ in 0..attempts {
            if self.missing_shards(node) == 0 {
                return;
            }
            let Ok(connection) =
                Connection::open(addr, &config.client_id, config.connect_timeout).await
            else {
                return;
            };
            if connection.info().node_id != node {
                // The address now belongs to another node: metadata will say.
                return;
            }
            self.adopt(node, addr, connection);
        }
        tracing::debug!(
            node,
            missing = self.missing_shards(node),
            "not every shard got its own connection"
        );
    }

    /// A connection to `target`'s node, preferably to its shard; connects to the
    /// node (by its address from Metadata) when there is none.
    pub(crate) async fn connection_to(&self, target: Target) -> Result<Arc<Connection>> {
        if let Some(connection) = self.lookup(target) {
            return Ok(connection);
        }
        let addr = {
            let known = self.lock_nodes().get(&target.node).map(|n| n.addr.clone());
            known
                .filter(|a| !a.is_empty())
                .or_else(|| self.lock_addresses().get(&target.node).cloned())
        };
        let Some(addr) = addr else {
            return Err(Error::Connect {
                addr: format!("node {}", target.node),
                reason: "its address is not known yet (refreshing metadata)".into(),
            });
        };
        let config = &self.inner.config;
        let connection = Connection::open(&addr, &config.client_id, config.connect_timeout).await?;
        if connection.info().node_id != target.node {
            return Err(Error::Connect {
                addr,
                reason: format!(
                    "it is node {}, not node {} (refreshing metadata)",
                    connection.info().node_id,
                    target.node
                ),
            });
        }
        self.adopt(target.node, &addr, connection);
        if config.shard_aware {
            self.fill_shards(target.node, &addr).await;
        }
        self.lookup(target).ok_or_else(|| Error::Connect {
            addr,
            reason: "no live connection after connecting".into(),
        })
    }

    fn lookup(&self, target: Target) -> Option<Arc<Connection>> {
        let nodes = self.lock_nodes();
        let node = nodes.get(&target.node)?;
        node.live(target.shard).or_else(|| node.any_live())
    }

    /// A connection for admin requests (the bootstrap node, or the next one up).
    async fn home_connection(&self) -> Result<Arc<Connection>> {
        if let Some(connection) = self.home().and_then(|node| {
            self.lock_nodes()
                .get(&node)
                .and_then(NodeConnections::any_live)
        }) {
            return Ok(connection);
        }
        self.reconnect_home().await?;
        self.home()
            .and_then(|node| {
                self.lock_nodes()
                    .get(&node)
                    .and_then(NodeConnections::any_live)
            })
            .ok_or_else(|| Error::Connect {
                addr: self.inner.config.brokers.join(","),
                reason: "no live connection after reconnecting".into(),
            })
    }

    /// Sends a request to `target` (its leader node and shard).
    pub(crate) async fn send_to(
        &self,
        target: Target,
        body: &RequestBody,
        payload: Vec<Bytes>,
        timeout: Duration,
    ) -> Result<ResponseBody> {
        let connection = self.connection_to(target).await?;
        connection.request(body, payload, timeout).await
    }

    /// Sends a request without payload to the bootstrap node with the default
    /// timeout.
    pub async fn send(&self, body: &RequestBody) -> Result<ResponseBody> {
        let timeout = self.inner.config.request_timeout;
        let connection = self.home_connection().await?;
        connection.request(body, Vec::new(), timeout).await
    }

    /// Cluster metadata for `topics` (empty = all topics).
    pub async fn metadata(&self, topics: &[&str]) -> Result<Metadata> {
        let body = RequestBody::Metadata {
            topics: topics.iter().map(|topic| (*topic).to_owned()).collect(),
        };
        match self.send(&body).await? {
            ResponseBody::Metadata(metadata) => {
                let mut addresses = self.lock_addresses();
                for broker in metadata.brokers.iter().filter(|b| b.port != 0) {
                    addresses.insert(broker.node_id, format!("{}:{}", broker.host, broker.port));
                }
                Ok(metadata)
            }
            other => Err(unexpected("Metadata", &other)),
        }
    }

    /// The partition layout of `topic`, cached; `refresh` forces a new lookup.
    pub async fn topic_route(&self, topic: &str, refresh: bool) -> Result<Arc<TopicRoute>> {
        if !refresh {
            if let Some(route) = self.lock_routes().get(topic) {
                return Ok(route.clone());
            }
        }
        let metadata = self.metadata(&[topic]).await?;
        let found = metadata
            .topics
            .into_iter()
            .find(|candidate| candidate.name == topic);
        let topic_metadata = found.ok_or_else(|| Error::UnknownTopic(topic.to_owned()))?;
        if topic_metadata.error == Code::UnknownTopic {
            return Err(Error::UnknownTopic(topic.to_owned()));
        }
        check_code(topic_metadata.error, None)?;
        let route = Arc::new(route_from(topic, &topic_metadata.partitions)?);
        self.lock_routes().insert(topic.to_owned(), route.clone());
        Ok(route)
    }

    /// Creates a topic (the cluster's default replication factor).
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        configs: Vec<(String, String)>,
    ) -> Result<()> {
        self.create_topic_replicated(name, partitions, 0, configs)
            .await
    }

    /// Creates a topic with `replication_factor` replicas per partition (0: the
    /// cluster's default, min(3, nodes)).
    pub async fn create_topic_replicated(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: u16,
        configs: Vec<(String, String)>,
    ) -> Result<()> {
        let body = RequestBody::CreateTopics {
            topics: vec![NewTopic {
                name: name.to_owned(),
                partitions,
                configs,
                replication_factor,
            }],
            validate_only: false,
        };
        match self.send(&body).await? {
            ResponseBody::CreateTopics(results) => single_result(name, results),
            other => Err(unexpected("CreateTopics", &other)),
        }
    }

    /// Deletes a topic.
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        let body = RequestBody::DeleteTopics {
            names: vec![name.to_owned()],
        };
        self.lock_routes().remove(name);
        match self.send(&body).await? {
            ResponseBody::DeleteTopics(results) => single_result(name, results),
            other => Err(unexpected("DeleteTopics", &other)),
        }
    }

    /// Every topic with its partition count.
    pub async fn list_topics(&self) -> Result<Vec<TopicSummary>> {
        match self.send(&RequestBody::ListTopics).await? {
            ResponseBody::ListTopics(topics) => Ok(topics),
            other => Err(unexpected("ListTopics", &other)),
        }
    }

    /// Describes topics (empty = all). Per-topic errors are in each description.
    pub async fn describe_topics(&self, names: &[&str]) -> Result<Vec<TopicDescription>> {
        let body = RequestBody::DescribeTopics {
            names: names.iter().map(|name| (*name).to_owned()).collect(),
        };
        match self.send(&body).await? {
            ResponseBody::DescribeTopics(topics) => Ok(topics),
            other => Err(unexpected("DescribeTopics", &other)),
        }
    }

    /// Describes one topic; a topic error becomes `Err`.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicDescription> {
        let topics = self.describe_topics(&[name]).await?;
        let found = topics.into_iter().find(|topic| topic.name == name);
        let topic = found.ok_or_else(|| Error::UnknownTopic(name.to_owned()))?;
        match topic.error {
            Code::None => Ok(topic),
            Code::UnknownTopic => Err(Error::UnknownTopic(name.to_owned())),
            code => Err(Error::from_code(code, topic.message.as_deref())),
        }
    }

    /// Looks up an offset of one partition (sent to the partition's shard).
    pub async fn list_offsets(
        &self,
        topic: &str,
        partition: u32,
        query: OffsetQuery,
    ) -> Result<ListedOffset> {
        let mut refresh = false;
        let mut attempts = 0;
        let response = loop {
            attempts += 1;
            let route = self.topic_route(topic, refresh).await?;
            if partition >= route.partition_count() {
                return Err(Error::UnknownPartition {
                    topic: topic.to_owned(),
                    partition,
                });
            }
            let result = match route.target(partition) {
                Some(target) => {
                    let body = RequestBody::ListOffsets {
                        topics: vec![(
                            topic.to_owned(),
                            vec![ListOffsetsSpec { partition, query }],
                        )],
                    };
                    let timeout = self.inner.config.request_timeout;
                    self.send_to(target, &body, Vec::new(), timeout).await
                }
                None => Err(Error::from_code(Code::LeaderNotAvailable, None)),
            };
            match result {
                Ok(ResponseBody::ListOffsets(topics)) => {
                    let stale = topics
                        .iter()
                        .flat_map(|(_, r)| r)
                        .any(|r| r.partition == partition && r.error.means_stale_route());
                    if stale && attempts < LEADER_RETRIES {
                        refresh = true;
                        tokio::time::sleep(LEADER_RETRY_WAIT).await;
                        continue;
                    }
                    break ResponseBody::ListOffsets(topics);
                }
                Ok(other) => break other,
                Err(error) if error.means_stale_route() && attempts < LEADER_RETRIES => {
                    refresh = true;
                    tokio::time::sleep(LEADER_RETRY_WAIT).await;
                }
                Err(error) => return Err(error),
            }
        };
        let ResponseBody::ListOffsets(topics) = response else {
            return Err(unexpected("ListOffsets", &response));
        };
        let results = topics
            .into_iter()
            .filter(|(name, _)| name == topic)
            .flat_map(|(_, results)| results);
        let result = results
            .into_iter()
            .find(|result| result.partition == partition)
            .ok_or_else(|| {
                Error::MalformedResponse(format!("no ListOffsets result for {topic}/{partition}"))
            })?;
        partition_error(topic, partition, result.error, None)?;
        Ok(ListedOffset {
            offset: result.offset,
            timestamp_ms: result.timestamp_ms,
            log_start_offset: result.log_start_offset,
            high_watermark: result.high_watermark,
        })
    }
}

/// Maps a per-partition error code to the most specific [`Error`].
pub(crate) fn partition_error(
    topic: &str,
    partition: u32,
    code: Code,
    message: Option<&str>,
) -> Result<()> {
    match code {
        Code::None => Ok(()),
        Code::UnknownTopic => Err(Error::UnknownTopic(topic.to_owned())),
        Code::UnknownPartition => Err(Error::UnknownPartition {
            topic: topic.to_owned(),
            partition,
        }),
        code => Err(Error::from_code(code, message)),
    }
}

fn route_from(
    topic: &str,
    partitions: &[crate::response::PartitionMetadata],
) -> Result<TopicRoute> {
    let mut shards = Vec::with_capacity(partitions.len());
    let mut leaders = Vec::with_capacity(partitions.len());
    for (index, partition) in partitions.iter().enumerate() {
        if partition.partition as usize != index {
            return Err(Error::MalformedResponse(format!(
                "metadata for {topic} skips partition {index}"
            )));
        }
        shards.push(partition.shard);
        leaders.push(partition.leader_node);
    }
    if shards.is_empty() {
        return Err(Error::MalformedResponse(format!(
            "metadata for {topic} lists no partitions"
        )));
    }
    Ok(TopicRoute {
        name: Arc::from(topic),
        shards,
        leaders,
    })
}

fn single_result(name: &str, results: Vec<TopicResult>) -> Result<()> {
    let found = results.into_iter().find(|result| result.name == name);
    let result =
        found.ok_or_else(|| Error::MalformedResponse(format!("no result for topic {name}")))?;
    match result.error {
        Code::UnknownTopic => Err(Error::UnknownTopic(name.to_owned())),
        code => check_code(code, result.message.as_deref()),
    }
}

pub(crate) fn unexpected(expected: &str, got: &ResponseBody) -> Error {
    let kind = match got {
        ResponseBody::None => "no body".to_owned(),
        other => format!("{other:?}").chars().take(40).collect(),
    };
    Error::MalformedResponse(format!("expected a {expected} response, got {kind}"))
}

fn with_default_port(broker: &str) -> String {
    let has_port = broker.rsplit_once(':').is_some_and(|(host, port)| {
        !port.is_empty()
            && port.chars().all(|c| c.is_ascii_digit())
            && (!host.contains(':') || host.ends_with(']'))
    });
    if has_port {
        broker.to_owned()
    } else {
        format!("{broker}:{DEFAULT_PORT}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_port_is_added() {
        assert_eq!(with_default_port("localhost"), "localhost:9440");
        assert_eq!(with_default_port("10.0.0.1:1234"), "10.0.0.1:1234");
        assert_eq!(with_default_port("[::1]:5"), "[::1]:5");
    }
}
