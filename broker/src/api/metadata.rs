//! Metadata: brokers, topics, partitions with leader node and owning shard.

use std::rc::Rc;

use flatbuffers::FlatBufferBuilder;
use sluice_schema::wire::{self, ErrorCode};

use super::checks;
use crate::protocol::{ok, Outgoing, ResponseSize};
use crate::shard::Shard;

pub(super) async fn handle(
    shard: &Rc<Shard>,
    id: u32,
    request: Option<wire::MetadataRequest<'_>>,
) -> Outgoing {
    let metadata = shard.topics();
    let names: Vec<String> = match request.and_then(|r| r.topics()) {
        Some(list) if !list.is_empty() => match checks::names(id, list.iter()) {
            Ok(names) => names,
            Err(response) => return response,
        },
        _ => metadata.topics.keys().cloned().collect(),
    };
    let mut size = ResponseSize::new();
    for name in &names {
        let topic = metadata.topics.get(name);
        let partitions = topic.map_or(0, |t| t.partitions.len());
        let replicas = topic.map_or(0, |t| t.replicas.iter().map(Vec::len).sum::<usize>());
        size.add(1, ResponseSize::item_with_message(name.len()))
            .add(partitions, ResponseSize::TABLE_BYTES + 8)
            .add(replicas, 4);
    }
    if let Err(response) = size.check(id, "this Metadata request") {
        return response;
    }
    let mut fbb = FlatBufferBuilder::with_capacity(1024);
    let brokers: Vec<_> = known_brokers(shard)
        .into_iter()
        .map(|(node, host, port, shard_count, reachable)| {
            let host = fbb.create_string(&host);
            wire::BrokerInfo::create(
                &mut fbb,
                &wire::BrokerInfoArgs {
                    node_id: node,
                    host: Some(host),
                    port,
                    shard_count,
                    reachable,
                },
            )
        })
        .collect();
    let brokers = fbb.create_vector(&brokers);
    let mut topics = Vec::with_capacity(names.len());
    for name in &names {
        let topic_name = fbb.create_string(name);
        let (error, partitions) = match metadata.topics.get(name) {
            None => (ErrorCode::UnknownTopic, None),
            Some(topic) => {
                let partitions: Vec<_> = (0..topic.partitions.len())
                    .map(|index| {
                        let view = shard.partition_view(topic, index);
                        let replicas: Vec<u32> = view.replicas.iter().map(|n| n.0).collect();
                        let replicas = fbb.create_vector(&replicas);
                        wire::PartitionMetadata::create(
                            &mut fbb,
                            &wire::PartitionMetadataArgs {
                                partition: index as u32,
                                leader_node: view.leader.map_or(0, |n| n.0),
                                shard: view.leader_shard,
                                error: if view.leader.is_some() {
                                    ErrorCode::None
                                } else {
                                    ErrorCode::LeaderNotAvailable
                                },
                                replicas: Some(replicas),
                                leader_epoch: view.epoch,
                            },
                        )
                    })
                    .collect();
                (ErrorCode::None, Some(fbb.create_vector(&partitions)))
            }
        };
        topics.push(wire::TopicMetadata::create(
            &mut fbb,
            &wire::TopicMetadataArgs {
                name: Some(topic_name),
                error,
                partitions,
            },
        ));
    }
    let topics = fbb.create_vector(&topics);
    let body = wire::MetadataResponse::create(
        &mut fbb,
        &wire::MetadataResponseArgs {
            brokers: Some(brokers),
            topics: Some(topics),
            controller_node: shard.controller_leader().map_or(0, |n| n.0),
            node_id: shard.settings.node_id.0,
        },
    );
    ok(
        fbb,
        id,
        wire::ResponseBody::MetadataResponse,
        body.as_union_value(),
        Vec::new(),
    )
}

/// (node, host, port, shards, reachable) of every node of the cluster (host ""
/// and port 0 where the address is not known yet).
fn known_brokers(shard: &Shard) -> Vec<(u32, String, u16, u16, bool)> {
    let own = (
        shard.settings.node_id.0,
        shard.settings.advertised_host.clone(),
        shard.settings.advertised_port,
        shard.mesh.shard_count() as u16,
        true,
    );
    let Some(cluster) = shard.cluster.as_deref() else {
        return vec![own];
    };
    cluster
        .view
        .nodes()
        .into_iter()
        .map(|(node, address, alive)| {
            if node == shard.settings.node_id {
                return own.clone();
            }
            match address {
                Some(a) => (node.0, a.host, a.port, a.shard_count, alive),
                None => (node.0, String::new(), 0, 0, false),
            }
        })
        .collect()
}
