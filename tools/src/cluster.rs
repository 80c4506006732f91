//! `sluice cluster status`: the nodes, the controller, where partitions lead, and
//! which partitions are under-replicated — as the node asked sees it.

use std::collections::BTreeMap;

use clap::Subcommand;
use serde_json::json;

use crate::output::{line, print_json, print_table, OutputFormat};
use crate::{connect, CliResult};

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Nodes, controller leader, partitions per node, under-replicated partitions.
    Status {
        /// Output format (overrides the global one).
        #[arg(long, value_enum)]
        format: Option<OutputFormat>,
    },
}

#[derive(Default)]
struct NodeCounts {
    leaders: usize,
    replicas: usize,
}

pub async fn run(brokers: &[String], format: OutputFormat, command: ClusterCommand) -> CliResult {
    let ClusterCommand::Status { format: own } = command;
    let client = connect(brokers).await?;
    let metadata = client.metadata(&[]).await?;
    let topics = client.describe_topics(&[]).await?;
    let mut counts: BTreeMap<u32, NodeCounts> = BTreeMap::new();
    for broker in &metadata.brokers {
        counts.entry(broker.node_id).or_default();
    }
    let mut under_replicated = Vec::new();
    let mut leaderless = Vec::new();
    for topic in &topics {
        for partition in &topic.partitions {
            if partition.leader_node != 0 {
                counts.entry(partition.leader_node).or_default().leaders += 1;
            } else {
                leaderless.push(json!({"topic": topic.name, "partition": partition.partition}));
            }
            for replica in &partition.replicas {
                counts.entry(*replica).or_default().replicas += 1;
            }
            if partition.leader_node != 0
                && usize::from(partition.in_sync) < partition.replicas.len()
            {
                under_replicated.push(json!({
                    "topic": topic.name,
                    "partition": partition.partition,
                    "leader": partition.leader_node,
                    "replicas": partition.replicas,
                    "in_sync": partition.in_sync,
                    "in_sync_replicas": partition.in_sync_replicas,
                }));
            }
        }
    }
    let nodes: Vec<_> = metadata
        .brokers
        .iter()
        .map(|broker| {
            let count = counts.get(&broker.node_id);
            json!({
                "node": broker.node_id,
                "address": if broker.port == 0 { String::new() } else { format!("{}:{}", broker.host, broker.port) },
                "reachable": broker.reachable,
                "shards": broker.shard_count,
                "leaders": count.map_or(0, |c| c.leaders),
                "replicas": count.map_or(0, |c| c.replicas),
            })
        })
        .collect();
    let status = json!({
        "answered_by": metadata.node_id,
        "controller": metadata.controller_node,
        "nodes": nodes,
        "under_replicated": under_replicated,
        "leaderless": leaderless,
    });
    if own.unwrap_or(format) == OutputFormat::Json {
        return print_json(&status);
    }
    let controller = match metadata.controller_node {
        0 => "none (single node, or an election in progress)".to_string(),
        node => format!("node {node}"),
    };
    line(&format!(
        "controller: {controller}  (answered by node {})",
        metadata.node_id
    ))?;
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|node| {
            vec![
                node["node"].to_string(),
                node["address"].as_str().unwrap_or_default().to_string(),
                if node["reachable"].as_bool().unwrap_or(false) {
                    "up"
                } else {
                    "down"
                }
                .to_string(),
                node["leaders"].to_string(),
                node["replicas"].to_string(),
            ]
        })
        .collect();
    print_table(&["NODE", "ADDRESS", "STATE", "LEADERS", "REPLICAS"], &rows)?;
    line(&format!(
        "under-replicated partitions: {}; without a leader: {}",
        under_replicated.len(),
        leaderless.len()
    ))?;
    Ok(())
}
