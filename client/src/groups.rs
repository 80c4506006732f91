//! Consumer-group and idempotent-producer requests on [`Client`]: finding a
//! group's coordinator, heartbeats, offset commit and fetch, listing,
//! describing and deleting groups, and InitProducerId.
//!
//! A group's coordinator is the leader of partition
//! [`group_partition`]`(group, N)` of [`OFFSETS_TOPIC`] (N: that topic's partition
//! count). The broker creates the topic on the first group request it receives;
//! until the client sees it in Metadata, group requests go to the bootstrap
//! node. A node that does not coordinate the group answers `NotLeader` (or
//! `LeaderNotAvailable`) with `leader_node` set; the client then refreshes the
//! topic's route and retries at the leader, like the producer does for a
//! partition that moved.

use std::collections::{BTreeMap, HashMap};

use sluice_schema::groups::{group_partition, validate_group_id, OFFSETS_TOPIC};

use crate::client::{
    partition_error, unexpected, Client, Target, LEADER_RETRIES, LEADER_RETRY_WAIT,
};
use crate::error::{check_code, Code, Error, Result};
use crate::request::{GroupHeartbeatRequest, OffsetCommitSpec, RequestBody, TopicPartitions};
use crate::response::{
    CommittedOffset, GroupDescription, GroupHeartbeatResult, GroupSummary, ResponseBody,
};

/// `(topic, partition)`.
pub type TopicPartition = (String, u32);

/// An idempotent producer's identity (from InitProducerId).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerIdentity {
    /// Producer id.
    pub producer_id: i64,
    /// Producer epoch.
    pub producer_epoch: i16,
}

fn check_group_id(group_id: &str) -> Result<()> {
    validate_group_id(group_id).map_err(|message| Error::InvalidGroupId {
        message: Some(message),
    })
}

/// The response-level error of a group response, as `Err`.
fn check_group_status(body: &ResponseBody) -> Result<()> {
    match body.group_status() {
        Some((code, message, _)) => check_code(code, message),
        None => Ok(()),
    }
}

impl Client {
    /// Where `group_id`'s requests go: the leader of its partition of
    /// [`OFFSETS_TOPIC`]. `None` while that topic does not exist yet (the broker
    /// creates it on the first group request; any node, the bootstrap node,
    /// takes that request).
    pub async fn coordinator(&self, group_id: &str) -> Result<Option<Target>> {
        check_group_id(group_id)?;
        self.coordinator_for(group_id, false).await
    }

    async fn coordinator_for(&self, group_id: &str, refresh: bool) -> Result<Option<Target>> {
        match self.topic_route(OFFSETS_TOPIC, refresh).await {
            Ok(route) => {
                let partition = group_partition(group_id, route.partition_count());
                match route.target(partition) {
                    Some(target) => Ok(Some(target)),
                    None => Err(Error::from_code(
                        Code::LeaderNotAvailable,
                        Some(&format!(
                            "no leader is known for partition {partition} of {OFFSETS_TOPIC}"
                        )),
                    )),
                }
            }
            Err(Error::UnknownTopic(_)) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Sends a group request to the group's coordinator, following NotLeader
    /// answers (response-level or a failed connection) to the leader.
    async fn send_group(&self, group_id: &str, body: &RequestBody) -> Result<ResponseBody> {
        let timeout = self.config().request_timeout;
        let mut refresh = false;
        // The node that refused last, and the leader it named.
        let mut refused: Option<(Option<u32>, u32)> = None;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let routed = self.coordinator_for(group_id, refresh).await;
            let target = match (routed, refused) {
                // Metadata still names the node that refused: trust its hint.
                (Ok(Some(target)), Some((by, leader)))
                    if by == Some(target.node) && leader != 0 && leader != target.node =>
                {
                    Ok(Some(Target {
                        node: leader,
                        shard: target.shard,
                    }))
                }
                (Ok(None), Some((_, leader))) if leader != 0 => Ok(Some(Target {
                    node: leader,
                    shard: 0,
                })),
                (routed, _) => routed,
            };
            let (node, result) = match target {
                Ok(Some(target)) => (
                    Some(target.node),
                    self.send_to(target, body, Vec::new(), timeout).await,
                ),
                Ok(None) => (self.home(), self.send(body).await),
                Err(error) => (None, Err(error)),
            };
            let retry = match &result {
                Ok(response) => match response.group_status() {
                    Some((code, _, leader)) if code.means_stale_route() => {
                        refused = Some((node, leader));
                        true
                    }
                    _ => false,
                },
                Err(error) => {
                    refused = None;
                    error.means_stale_route()
                }
            };
            if !retry || attempts >= LEADER_RETRIES {
                return result;
            }
            tracing::debug!(group = group_id, ?node, "group coordinator moved; retrying");
            refresh = true;
            tokio::time::sleep(LEADER_RETRY_WAIT).await;
        }
    }

    /// Sends one group heartbeat (join, stay or leave). A response-level error
    /// becomes `Err` (e.g. [`Error::UnknownMemberId`] for a fenced member).
    pub async fn group_heartbeat(
        &self,
        request: &GroupHeartbeatRequest,
    ) -> Result<GroupHeartbeatResult> {
        check_group_id(&request.group_id)?;
        let body = RequestBody::GroupHeartbeat(request.clone());
        let response = self.send_group(&request.group_id, &body).await?;
        check_group_status(&response)?;
        match response {
            ResponseBody::GroupHeartbeat(result) => Ok(result),
            other => Err(unexpected("GroupHeartbeat", &other)),
        }
    }

    /// Commits offsets (each the next offset to consume) for a group member
    /// (`member_id` and the epoch of its latest heartbeat), or, with an empty
    /// `member_id` and epoch -1, for a group without members (the broker answers
    /// [`Error::GroupNotEmpty`] while it has some). Nothing to commit: `Ok`
    /// without a request.
    pub async fn commit_offsets<I>(
        &self,
        group_id: &str,
        member_id: &str,
        member_epoch: i32,
        offsets: I,
    ) -> Result<()>
    where
        I: IntoIterator<Item = (TopicPartition, u64)>,
    {
        check_group_id(group_id)?;
        let mut by_topic: BTreeMap<String, BTreeMap<u32, u64>> = BTreeMap::new();
        for ((topic, partition), offset) in offsets {
            by_topic.entry(topic).or_default().insert(partition, offset);
        }
        if by_topic.is_empty() {
            return Ok(());
        }
        let topics = by_topic
            .into_iter()
            .map(|(topic, partitions)| {
                let specs = partitions
                    .into_iter()
                    .map(|(partition, offset)| OffsetCommitSpec {
                        partition,
                        offset,
                        metadata: None,
                    })
                    .collect();
                (topic, specs)
            })
            .collect();
        let body = RequestBody::OffsetCommit {
            group_id: group_id.to_owned(),
            member_id: member_id.to_owned(),
            member_epoch,
            topics,
        };
        let response = self.send_group(group_id, &body).await?;
        check_group_status(&response)?;
        let ResponseBody::OffsetCommit(result) = response else {
            return Err(unexpected("OffsetCommit", &response));
        };
        for (topic, partitions) in &result.topics {
            for partition in partitions {
                partition_error(topic, partition.partition, partition.error, None)?;
            }
        }
        Ok(())
    }

    /// A group's committed offsets: of the given partitions, or (`None`) every
    /// partition it has committed. A partition with nothing committed has
    /// `offset: None` (or is left out).
    pub async fn fetch_offsets(
        &self,
        group_id: &str,
        topics: Option<&[TopicPartitions]>,
    ) -> Result<BTreeMap<TopicPartition, CommittedOffset>> {
        check_group_id(group_id)?;
        let body = RequestBody::OffsetFetch {
            group_id: group_id.to_owned(),
            topics: topics.map(<[TopicPartitions]>::to_vec),
        };
        let response = self.send_group(group_id, &body).await?;
        check_group_status(&response)?;
        let ResponseBody::OffsetFetch(result) = response else {
            return Err(unexpected("OffsetFetch", &response));
        };
        let mut offsets = BTreeMap::new();
        for (topic, partitions) in result.topics {
            for committed in partitions {
                offsets.insert((topic.clone(), committed.partition), committed);
            }
        }
        Ok(offsets)
    }

    /// Every group of the cluster: each node answers for the groups it
    /// coordinates, so every reachable node is asked and the answers merged
    /// (sorted by group id).
    pub async fn list_groups(&self) -> Result<Vec<GroupSummary>> {
        let metadata = self.metadata(&[OFFSETS_TOPIC]).await?;
        let home = self.home();
        let mut nodes: Vec<u32> = metadata
            .brokers
            .iter()
            .filter(|broker| broker.reachable && (broker.port != 0 || Some(broker.node_id) == home))
            .map(|broker| broker.node_id)
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        let timeout = self.config().request_timeout;
        let mut merged: HashMap<String, GroupSummary> = HashMap::new();
        let mut answered = 0;
        let mut last_error = None;
        let asks: Vec<Option<u32>> = if nodes.is_empty() {
            vec![None]
        } else {
            nodes.into_iter().map(Some).collect()
        };
        for node in asks {
            let result = match node {
                Some(node) if Some(node) != home => {
                    let target = Target { node, shard: 0 };
                    self.send_to(target, &RequestBody::ListGroups, Vec::new(), timeout)
                        .await
                }
                _ => self.send(&RequestBody::ListGroups).await,
            };
            let result = result.and_then(|body| {
                check_group_status(&body)?;
                match body {
                    ResponseBody::ListGroups(list) => Ok(list.groups),
                    other => Err(unexpected("ListGroups", &other)),
                }
            });
            match result {
                Ok(groups) => {
                    answered += 1;
                    for group in groups {
                        match merged.get(&group.group_id) {
                            Some(known) if known.group_epoch >= group.group_epoch => {}
                            _ => {
                                merged.insert(group.group_id.clone(), group);
                            }
                        }
                    }
                }
                Err(error) if error.means_stale_route() => {
                    tracing::warn!(?node, %error, "a node did not answer ListGroups");
                    last_error = Some(error);
                }
                Err(error) => return Err(error),
            }
        }
        if answered == 0 {
            if let Some(error) = last_error {
                return Err(error);
            }
        }
        let mut groups: Vec<GroupSummary> = merged.into_values().collect();
        groups.sort_by(|a, b| a.group_id.cmp(&b.group_id));
        Ok(groups)
    }

    /// A group's state, members and committed offsets.
    /// [`Error::UnknownGroup`] when there is no such group.
    pub async fn describe_group(&self, group_id: &str) -> Result<GroupDescription> {
        check_group_id(group_id)?;
        let body = RequestBody::DescribeGroup {
            group_id: group_id.to_owned(),
        };
        let response = self.send_group(group_id, &body).await?;
        check_group_status(&response)?;
        match response {
            ResponseBody::DescribeGroup(description) => Ok(description),
            other => Err(unexpected("DescribeGroup", &other)),
        }
    }

    /// Deletes an empty group and its committed offsets
    /// ([`Error::GroupNotEmpty`] while it has members, [`Error::UnknownGroup`]
    /// when there is none).
    pub async fn delete_group(&self, group_id: &str) -> Result<()> {
        check_group_id(group_id)?;
        let body = RequestBody::DeleteGroup {
            group_id: group_id.to_owned(),
        };
        let response = self.send_group(group_id, &body).await?;
        check_group_status(&response)?;
        match response {
            ResponseBody::DeleteGroup(_) => Ok(()),
            other => Err(unexpected("DeleteGroup", &other)),
        }
    }

    /// A fresh producer id and epoch for idempotent produce. A broker without
    /// idempotence answers with an `UnknownRequestKind` error.
    pub async fn init_producer_id(&self) -> Result<ProducerIdentity> {
        match self.send(&RequestBody::InitProducerId).await? {
            ResponseBody::InitProducerId(result) => {
                check_code(result.error, result.message.as_deref())?;
                Ok(ProducerIdentity {
                    producer_id: result.producer_id,
                    producer_epoch: result.producer_epoch,
                })
            }
            other => Err(unexpected("InitProducerId", &other)),
        }
    }
}
