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

/// Where each partition of a topic lives (from Metadata).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRoute {
    /// Topic name.
    pub name: Arc<str>,
    /// Owning shard of each partition, indexed by partition number.
    pub shards: Vec<u16>,
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
    connections: Mutex<Vec<Option<Arc<Connection>>>>,
    routes: Mutex<HashMap<String, Arc<TopicRoute>>>,
    reconnecting: tokio::sync::Mutex<()>,
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
            connections: Mutex::new(Vec::new()),
            routes: Mutex::new(HashMap::new()),
            reconnecting: tokio::sync::Mutex::new(()),
        });
        let client = Client { inner };
        client.reconnect().await?;
        Ok(client)
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Shards of the connected broker (1 before anything is known).
    pub fn shard_count(&self) -> u16 {
        self.lock_connections().len().max(1) as u16
    }

    /// Shards that currently have their own live connection.
    pub fn connected_shards(&self) -> Vec<u16> {
        let connections = self.lock_connections();
        let live = connections.iter().enumerate();
        live.filter(|(_, connection)| connection.as_ref().is_some_and(|c| c.is_alive()))
            .map(|(shard, _)| shard as u16)
            .collect()
    }

    fn lock_connections(&self) -> std::sync::MutexGuard<'_, Vec<Option<Arc<Connection>>>> {
        self.inner
            .connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_routes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<TopicRoute>>> {
        self.inner
            .routes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Opens a first connection and fills the per-shard set.
    async fn reconnect(&self) -> Result<()> {
        let _serialized = self.inner.reconnecting.lock().await;
        if self.any_live_connection().is_some() && self.missing_shards() == 0 {
            return Ok(());
        }
        let first = self.connect_any().await?;
        let addr = first.addr().to_owned();
        let shard_count = usize::from(first.info().shard_count);
        {
            let mut connections = self.lock_connections();
            connections.resize(shard_count, None);
            connections.retain(|_| true);
            let shard = usize::from(first.shard());
            connections[shard] = Some(Arc::new(first));
        }
        if self.inner.config.shard_aware {
            self.fill_shards(&addr, shard_count).await;
        }
        Ok(())
    }

    async fn connect_any(&self) -> Result<Connection> {
        let config = &self.inner.config;
        let mut failures = Vec::new();
        for broker in &config.brokers {
            let addr = with_default_port(broker);
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

    fn missing_shards(&self) -> usize {
        let connections = self.lock_connections();
        let live = |slot: &&Option<Arc<Connection>>| slot.as_ref().is_some_and(|c| c.is_alive());
        connections.len() - connections.iter().filter(live).count()
    }

    async fn fill_shards(&self, addr: &str, shard_count: usize) {
        let config = &self.inner.config;
        let attempts = SHARD_CONNECT_ATTEMPTS_PER_SHARD * shard_count;
        for _ in 0..attempts {
            if self.missing_shards() == 0 {
                return;
            }
            let Ok(connection) =
                Connection::open(addr, &config.client_id, config.connect_timeout).await
            else {
                return;
            };
            let shard = usize::from(connection.shard());
            let mut connections = self.lock_connections();
            let slot = connections.get_mut(shard);
            if let Some(slot) = slot {
                if !slot.as_ref().is_some_and(|c| c.is_alive()) {
                    *slot = Some(Arc::new(connection));
                }
            }
        }
        tracing::debug!(
            missing = self.missing_shards(),
            "not every shard got its own connection"
        );
    }

    fn any_live_connection(&self) -> Option<Arc<Connection>> {
        let connections = self.lock_connections();
        connections
            .iter()
            .flatten()
            .find(|connection| connection.is_alive())
            .cloned()
    }

    /// The connection owned by `shard`, or any live one; reconnects if none is.
    pub(crate) async fn connection_for_shard(&self, shard: u16) -> Result<Arc<Connection>> {
        if let Some(connection) = self.lookup_shard(shard) {
            return Ok(connection);
        }
        self.reconnect().await?;
        self.lookup_shard(shard).ok_or_else(|| Error::Connect {
            addr: self.inner.config.brokers.join(","),
            reason: "no live connection after reconnecting".into(),
        })
    }

    fn lookup_shard(&self, shard: u16) -> Option<Arc<Connection>> {
        let own = {
            let connections = self.lock_connections();
            connections.get(usize::from(shard)).cloned().flatten()
        };
        match own {
            Some(connection) if connection.is_alive() => Some(connection),
            _ => self.any_live_connection(),
        }
    }

    /// Sends a request on the connection of `shard` (or any connection).
    pub(crate) async fn send_to_shard(
        &self,
        shard: u16,
        body: &RequestBody,
        payload: Vec<Bytes>,
        timeout: Duration,
    ) -> Result<ResponseBody> {
        let connection = self.connection_for_shard(shard).await?;
        connection.request(body, payload, timeout).await
    }

    /// Sends a request without payload on any connection with the default timeout.
    pub async fn send(&self, body: &RequestBody) -> Result<ResponseBody> {
        let timeout = self.inner.config.request_timeout;
        self.send_to_shard(0, body, Vec::new(), timeout).await
    }

    /// Cluster metadata for `topics` (empty = all topics).
    pub async fn metadata(&self, topics: &[&str]) -> Result<Metadata> {
        let body = RequestBody::Metadata {
            topics: topics.iter().map(|topic| (*topic).to_owned()).collect(),
        };
        match self.send(&body).await? {
            ResponseBody::Metadata(metadata) => Ok(metadata),
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
        let route = self.topic_route(topic, false).await?;
        let shard = route
            .shard(partition)
            .ok_or_else(|| Error::UnknownPartition {
                topic: topic.to_owned(),
                partition,
            })?;
        let body = RequestBody::ListOffsets {
            topics: vec![(topic.to_owned(), vec![ListOffsetsSpec { partition, query }])],
        };
        let timeout = self.inner.config.request_timeout;
        let response = self
            .send_to_shard(shard, &body, Vec::new(), timeout)
            .await?;
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
    for (index, partition) in partitions.iter().enumerate() {
        if partition.partition as usize != index {
            return Err(Error::MalformedResponse(format!(
                "metadata for {topic} skips partition {index}"
            )));
        }
        shards.push(partition.shard);
    }
    if shards.is_empty() {
        return Err(Error::MalformedResponse(format!(
            "metadata for {topic} lists no partitions"
        )));
    }
    Ok(TopicRoute {
        name: Arc::from(topic),
        shards,
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
