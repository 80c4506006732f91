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
        let partitions = metadata.topics.get(name).map_or(0, |t| t.partitions.len());
        size.add(1, ResponseSize::item_with_message(name.len()))
            .add(partitions, ResponseSize::TABLE_BYTES);
    }
    if let Err(response) = size.check(id, "this Metadata request") {
        return response;
    }
    let mut fbb = FlatBufferBuilder::with_capacity(1024);
    let host = fbb.create_string(&shard.settings.advertised_host);
    let broker = wire::BrokerInfo::create(
        &mut fbb,
        &wire::BrokerInfoArgs {
            node_id: shard.settings.node_id.0,
            host: Some(host),
            port: shard.settings.advertised_port,
            shard_count: shard.mesh.shard_count() as u16,
        },
    );
    let brokers = fbb.create_vector(&[broker]);
    let mut topics = Vec::with_capacity(names.len());
    for name in &names {
        let topic_name = fbb.create_string(name);
        let (error, partitions) = match metadata.topics.get(name) {
            None => (ErrorCode::UnknownTopic, None),
            Some(topic) => {
                let partitions: Vec<_> = topic
                    .partitions
                    .iter()
                    .enumerate()
                    .map(|(index, placement)| {
                        wire::PartitionMetadata::create(
                            &mut fbb,
                            &wire::PartitionMetadataArgs {
                                partition: index as u32,
                                leader_node: shard.settings.node_id.0,
                                shard: placement.shard.0,
                                error: ErrorCode::None,
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
