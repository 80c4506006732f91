//! Node metadata: topics, their configs and where each partition lives (shard and
//! WAL log id), persisted in `<data-dir>/meta/node.json` and replaced atomically.
//!
//! The file also pins the data directory's shard count and format version: starting
//! with another shard count would put partitions' logs in WALs that do not hold
//! them, so it is refused with a message saying what to do.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::limits::{
    PARTITIONS_PER_NODE_MAX, PARTITIONS_PER_TOPIC_MAX, SEGMENT_BYTES_MAX, SEGMENT_BYTES_MIN,
    TOPICS_MAX, TOPIC_NAME_BYTES_MAX,
};
use crate::types::{LogId, NodeId, ShardId};

/// Version of the data-directory layout (metadata file + WAL format).
pub const DATA_DIR_FORMAT_VERSION: u32 = 1;

/// Per-topic settings (Kafka names and defaults where Kafka has them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicConfig {
    /// `retention.ms`: delete batches older than this; `None` (-1) keeps forever.
    pub retention_ms: Option<u64>,
    /// `retention.bytes`: keep at most this many bytes per partition; `None` (-1) is unlimited.
    pub retention_bytes: Option<u64>,
    /// `segment.bytes`: Sluice's WAL is shared by a shard's partitions, so this
    /// bounds how many bytes of one partition one WAL segment may hold before the
    /// WAL rolls (the granularity at which retention frees disk for it).
    pub segment_bytes: u64,
    /// `max.message.bytes`: largest record batch accepted, in bytes.
    pub max_message_bytes: u64,
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            retention_ms: Some(7 * 24 * 3600 * 1000),
            retention_bytes: None,
            segment_bytes: 1 << 30,
            max_message_bytes: 1024 * 1024 + 12,
        }
    }
}

/// Config keys a topic accepts.
pub const CONFIG_KEYS: [&str; 4] = [
    "retention.ms",
    "retention.bytes",
    "segment.bytes",
    "max.message.bytes",
];

impl TopicConfig {
    /// Applies `key=value` settings over the defaults, validating each.
    pub fn from_entries<'a>(
        entries: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<TopicConfig, String> {
        let mut config = TopicConfig::default();
        for (key, value) in entries {
            config.set(key, value)?;
        }
        Ok(config)
    }

    fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let number = |value: &str| -> Result<i64, String> {
            value
                .trim()
                .parse::<i64>()
                .map_err(|_| format!("{key}: '{value}' is not an integer"))
        };
        let optional = |value: &str| -> Result<Option<u64>, String> {
            match number(value)? {
                -1 => Ok(None),
                n if n >= 0 => Ok(Some(n as u64)),
                n => Err(format!("{key}: {n} must be -1 (unlimited) or >= 0")),
            }
        };
        match key {
            "retention.ms" => self.retention_ms = optional(value)?,
            "retention.bytes" => self.retention_bytes = optional(value)?,
            "segment.bytes" => {
                let n = number(value)?;
                if n < SEGMENT_BYTES_MIN as i64 || n > SEGMENT_BYTES_MAX as i64 {
                    return Err(format!(
                        "segment.bytes: {n} outside [{SEGMENT_BYTES_MIN}, {SEGMENT_BYTES_MAX}]"
                    ));
                }
                self.segment_bytes = n as u64;
            }
            "max.message.bytes" => {
                let n = number(value)?;
                let max = crate::limits::BATCH_BYTES_MAX as i64;
                if n < sluice_schema::batch::HEADER_BYTES as i64 || n > max {
                    return Err(format!(
                        "max.message.bytes: {n} outside [{}, {max}]",
                        sluice_schema::batch::HEADER_BYTES
                    ));
                }
                self.max_message_bytes = n as u64;
            }
            other => {
                return Err(format!(
                    "unknown config '{other}' (known: {})",
                    CONFIG_KEYS.join(", ")
                ))
            }
        }
        Ok(())
    }

    /// Every key with its effective value, Kafka-style (-1 for unlimited).
    pub fn entries(&self) -> Vec<(String, String)> {
        let show = |v: Option<u64>| v.map(|n| n.to_string()).unwrap_or_else(|| "-1".into());
        vec![
            ("retention.ms".into(), show(self.retention_ms)),
            ("retention.bytes".into(), show(self.retention_bytes)),
            ("segment.bytes".into(), self.segment_bytes.to_string()),
            (
                "max.message.bytes".into(),
                self.max_message_bytes.to_string(),
            ),
        ]
    }
}

/// Checks a topic name: 1..=249 bytes of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("topic name is empty".into());
    }
    if name.len() > TOPIC_NAME_BYTES_MAX {
        return Err(format!(
            "topic name is {} bytes; at most {TOPIC_NAME_BYTES_MAX}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("topic name '{name}' is reserved"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic name '{name}' has '{bad}'; use only [a-zA-Z0-9._-]"
        ));
    }
    Ok(())
}

/// Where one partition lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionPlacement {
    /// Owning shard (fixed for the partition's life).
    pub shard: ShardId,
    /// Its log in that shard's WAL (never reused).
    pub log_id: LogId,
    /// This node holds a replica (always, on a single node; in a cluster, when
    /// the node is among the partition's replicas).
    #[serde(default = "always")]
    pub local: bool,
}

fn always() -> bool {
    true
}

/// A topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topic {
    /// Name.
    pub name: String,
    /// Settings.
    pub config: TopicConfig,
    /// Partition i is `partitions[i]`.
    pub partitions: Vec<PartitionPlacement>,
    /// Cluster-wide topic id (from the controller; 0 on a single node).
    #[serde(default)]
    pub id: u32,
    /// Nodes holding each partition's replicas, the preferred leader first (empty
    /// on a single node).
    #[serde(default)]
    pub replicas: Vec<Vec<NodeId>>,
}

impl Topic {
    /// The replicas of `partition` (on a single node: just `node`).
    pub fn replicas_of(&self, partition: usize, node: NodeId) -> Vec<NodeId> {
        match self.replicas.get(partition) {
            Some(replicas) => replicas.clone(),
            None => vec![node],
        }
    }

    /// The Raft group of `partition`, in a cluster.
    pub fn group(&self, partition: u32) -> Option<crate::partition::GroupId> {
        (self.id != 0).then(|| crate::partition::GroupId::partition(self.id, partition))
    }
}

/// The node's durable metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMetadata {
    /// Data-dir format version.
    pub format_version: u32,
    /// This node.
    pub node_id: NodeId,
    /// Shards the data dir was created with.
    pub shard_count: u16,
    /// Next log id to hand out.
    pub next_log_id: u32,
    /// Topics by name.
    pub topics: BTreeMap<String, Topic>,
    /// In a cluster: the controller log position this metadata reflects.
    #[serde(default)]
    pub cluster: Option<crate::cluster::controller::ClusterState>,
}

/// Why metadata could not be loaded or changed.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// Another shard count or format.
    #[error("{0}")]
    Incompatible(String),
    /// Reading or writing the file failed.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What happened.
        message: String,
    },
    /// Invalid request (name, config, partition count, exists, unknown).
    #[error("{0}")]
    Invalid(String),
}

impl NodeMetadata {
    /// Empty metadata for a new data dir.
    pub fn new(node_id: NodeId, shard_count: u16) -> Self {
        NodeMetadata {
            format_version: DATA_DIR_FORMAT_VERSION,
            node_id,
            shard_count,
            next_log_id: 1,
            topics: BTreeMap::new(),
            cluster: None,
        }
    }

    fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("meta").join("node.json")
    }

    /// Loads the metadata of `data_dir`, or creates it; refuses another shard count
    /// or format version.
    pub fn load_or_create(
        data_dir: &Path,
        node_id: NodeId,
        shard_count: u16,
    ) -> Result<NodeMetadata, MetadataError> {
        let path = Self::path(data_dir);
        let io = |message: String| MetadataError::Io {
            path: path.clone(),
            message,
        };
        match std::fs::read(&path) {
            Ok(bytes) => {
                let metadata: NodeMetadata = serde_json::from_slice(&bytes)
                    .map_err(|e| io(format!("unreadable metadata: {e}")))?;
                if metadata.format_version != DATA_DIR_FORMAT_VERSION {
                    return Err(MetadataError::Incompatible(format!(
                        "{} was written by data-dir format version {}; this build uses version {}",
                        data_dir.display(),
                        metadata.format_version,
                        DATA_DIR_FORMAT_VERSION
                    )));
                }
                if metadata.shard_count != shard_count {
                    return Err(MetadataError::Incompatible(format!(
                        "{} was created with {} shards; start with --shards {} (partitions live in their shard's write-ahead log)",
                        data_dir.display(),
                        metadata.shard_count,
                        metadata.shard_count
                    )));
                }
                Ok(metadata)
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let metadata = NodeMetadata::new(node_id, shard_count);
                metadata.store(data_dir)?;
                Ok(metadata)
            }
            Err(error) => Err(io(error.to_string())),
        }
    }

    /// Writes the metadata durably: temp file, fsync, rename, fsync the directory.
    pub fn store(&self, data_dir: &Path) -> Result<(), MetadataError> {
        let path = Self::path(data_dir);
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let io = |message: String| MetadataError::Io {
            path: path.clone(),
            message,
        };
        std::fs::create_dir_all(&dir).map_err(|e| io(e.to_string()))?;
        let tmp = dir.join("node.json.tmp");
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| io(e.to_string()))?;
        {
            use std::io::Write;
            let mut file = std::fs::File::create(&tmp).map_err(|e| io(e.to_string()))?;
            file.write_all(&bytes).map_err(|e| io(e.to_string()))?;
            file.sync_all().map_err(|e| io(e.to_string()))?;
        }
        std::fs::rename(&tmp, &path).map_err(|e| io(e.to_string()))?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(e.to_string()))?;
        Ok(())
    }

    /// Adds a topic (in memory): validates, places partitions on the least-loaded
    /// shards, hands out log ids. The caller stores the metadata before using it.
    pub fn add_topic(
        &mut self,
        name: &str,
        partitions: u32,
        config: TopicConfig,
    ) -> Result<&Topic, MetadataError> {
        validate_topic_name(name).map_err(MetadataError::Invalid)?;
        if self.topics.contains_key(name) {
            return Err(MetadataError::Invalid(format!(
                "topic '{name}' already exists"
            )));
        }
        if partitions == 0 || partitions > PARTITIONS_PER_TOPIC_MAX {
            return Err(MetadataError::Invalid(format!(
                "partition count {partitions} outside [1, {PARTITIONS_PER_TOPIC_MAX}]"
            )));
        }
        if self.topics.len() >= TOPICS_MAX {
            return Err(MetadataError::Invalid(format!(
                "the node already has {TOPICS_MAX} topics"
            )));
        }
        let mut load = vec![0u64; usize::from(self.shard_count.max(1))];
        for topic in self.topics.values() {
            for placement in &topic.partitions {
                load[usize::from(placement.shard.0)] += 1;
            }
        }
        let node_partitions: usize = self.topics.values().map(|t| t.partitions.len()).sum();
        if node_partitions + partitions as usize > PARTITIONS_PER_NODE_MAX {
            return Err(MetadataError::Invalid(format!(
                "the node has {node_partitions} partitions; {partitions} more would pass its limit of {PARTITIONS_PER_NODE_MAX}"
            )));
        }
        // Log ids are never reused: running out is an error, never a wrap.
        let last_log_id = self
            .next_log_id
            .checked_add(partitions)
            .ok_or_else(|| {
                MetadataError::Invalid(format!(
                    "this node has handed out {} partition log ids; {partitions} more would exhaust the 32-bit id space (ids are never reused)",
                    self.next_log_id
                ))
            })?;
        let mut placements = Vec::with_capacity(partitions as usize);
        for _ in 0..partitions {
            let (shard, _) = load
                .iter()
                .enumerate()
                .min_by_key(|(index, count)| (**count, *index))
                .unwrap_or((0, &0));
            load[shard] += 1;
            placements.push(PartitionPlacement {
                shard: ShardId(shard as u16),
                log_id: LogId(self.next_log_id),
                local: true,
            });
            self.next_log_id += 1;
        }
        debug_assert_eq!(self.next_log_id, last_log_id);
        let topic = Topic {
            name: name.to_string(),
            config,
            partitions: placements,
            id: 0,
            replicas: Vec::new(),
        };
        Ok(self.topics.entry(name.to_string()).or_insert(topic))
    }

    /// Removes a topic (in memory); returns it.
    pub fn remove_topic(&mut self, name: &str) -> Result<Topic, MetadataError> {
        self.topics
            .remove(name)
            .ok_or_else(|| MetadataError::Invalid(format!("unknown topic '{name}'")))
    }
}

/// One line of a provisioning file: `name partitions [key=value ...]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProvisionedTopic {
    /// Topic name.
    pub name: String,
    /// Partition count.
    pub partitions: u32,
    /// Config settings.
    pub configs: Vec<(String, String)>,
}

/// Parses a provisioning file: one topic per line, `#` comments, blank lines ignored.
pub fn parse_provision(text: &str) -> Result<Vec<ProvisionedTopic>, String> {
    let mut out = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let at = |message: String| format!("line {}: {message}", number + 1);
        let name = words.next().unwrap_or_default().to_string();
        validate_topic_name(&name).map_err(at)?;
        let partitions = words
            .next()
            .ok_or_else(|| at(format!("'{name}' needs a partition count")))?
            .parse::<u32>()
            .map_err(|_| at(format!("'{name}': partition count is not a number")))?;
        let mut configs = Vec::new();
        for word in words {
            let (key, value) = word
                .split_once('=')
                .ok_or_else(|| at(format!("'{word}' is not key=value")))?;
            configs.push((key.to_string(), value.to_string()));
        }
        TopicConfig::from_entries(configs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(at)?;
        out.push(ProvisionedTopic {
            name,
            partitions,
            configs,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(validate_topic_name("order-processing.DLQ").is_ok());
        assert!(validate_topic_name("").is_err());
        assert!(validate_topic_name("..").is_err());
        assert!(validate_topic_name("a/b").unwrap_err().contains('/'));
        assert!(validate_topic_name(&"x".repeat(250)).is_err());
    }

    #[test]
    fn configs_are_validated_with_kafka_names() {
        let config =
            TopicConfig::from_entries([("retention.ms", "-1"), ("retention.bytes", "1000")])
                .unwrap();
        assert_eq!(config.retention_ms, None);
        assert_eq!(config.retention_bytes, Some(1000));
        assert!(TopicConfig::from_entries([("retention.ms", "soon")]).is_err());
        assert!(TopicConfig::from_entries([("retention.ms", "-5")]).is_err());
        assert!(TopicConfig::from_entries([("max.message.bytes", "10")]).is_err());
        assert!(TopicConfig::from_entries([("cleanup.policy", "compact")])
            .unwrap_err()
            .contains("unknown config"));
    }

    #[test]
    fn partitions_spread_over_shards_and_log_ids_are_unique() {
        let mut metadata = NodeMetadata::new(NodeId(1), 2);
        metadata.add_topic("a", 3, TopicConfig::default()).unwrap();
        metadata.add_topic("b", 3, TopicConfig::default()).unwrap();
        let shards: Vec<u16> = metadata
            .topics
            .values()
            .flat_map(|t| t.partitions.iter().map(|p| p.shard.0))
            .collect();
        assert_eq!(shards.iter().filter(|s| **s == 0).count(), 3);
        let mut logs: Vec<u32> = metadata
            .topics
            .values()
            .flat_map(|t| t.partitions.iter().map(|p| p.log_id.0))
            .collect();
        logs.sort();
        logs.dedup();
        assert_eq!(logs.len(), 6);
        assert!(metadata.add_topic("a", 1, TopicConfig::default()).is_err());
        assert!(metadata.add_topic("c", 0, TopicConfig::default()).is_err());
        metadata.remove_topic("a").unwrap();
        // Log ids are never reused.
        let c = metadata.add_topic("c", 1, TopicConfig::default()).unwrap();
        assert_eq!(c.partitions[0].log_id, LogId(7));
    }

    #[test]
    fn log_ids_never_wrap() {
        let mut metadata = NodeMetadata::new(NodeId(1), 2);
        metadata.next_log_id = u32::MAX - 2;
        let error = metadata
            .add_topic("late", 5, TopicConfig::default())
            .unwrap_err();
        assert!(error.to_string().contains("never reused"), "{error}");
        assert!(metadata.topics.is_empty());
        metadata
            .add_topic("fits", 2, TopicConfig::default())
            .unwrap();
        assert_eq!(metadata.next_log_id, u32::MAX);
    }

    #[test]
    fn the_node_partition_limit_is_enforced() {
        let mut metadata = NodeMetadata::new(NodeId(1), 2);
        let per_topic = PARTITIONS_PER_TOPIC_MAX;
        let topics = PARTITIONS_PER_NODE_MAX as u32 / per_topic;
        for i in 0..topics {
            metadata
                .add_topic(&format!("t{i}"), per_topic, TopicConfig::default())
                .unwrap();
        }
        let left = PARTITIONS_PER_NODE_MAX as u32 - topics * per_topic;
        assert!(metadata
            .add_topic("over", left + 1, TopicConfig::default())
            .is_err());
        metadata
            .add_topic("last", left, TopicConfig::default())
            .unwrap();
    }

    #[test]
    fn metadata_persists_and_refuses_another_shard_count() {
        let dir = std::env::temp_dir().join(format!("sluice-meta-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut metadata = NodeMetadata::load_or_create(&dir, NodeId(1), 2).unwrap();
        metadata
            .add_topic("orders", 3, TopicConfig::default())
            .unwrap();
        metadata.store(&dir).unwrap();
        let loaded = NodeMetadata::load_or_create(&dir, NodeId(1), 2).unwrap();
        assert_eq!(loaded, metadata);
        let error = NodeMetadata::load_or_create(&dir, NodeId(1), 4).unwrap_err();
        assert!(error.to_string().contains("--shards 2"), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_seed_provisioning_set_parses() {
        let text = "# the seed's example topics\nuser-events 3\norders 3\npayments 5 retention.ms=604800000\nnotifications 1\norder-processing.DLQ 3\n";
        let topics = parse_provision(text).unwrap();
        assert_eq!(topics.len(), 5);
        assert_eq!(topics[2].partitions, 5);
        assert!(parse_provision("bad/name 3").is_err());
        assert!(parse_provision("x three").unwrap_err().contains("line 1"));
    }
}
