//! `sluice topic create|list|describe|delete`.

use clap::{Args, Subcommand};
use serde_json::json;
use sluice_client::response::TopicDescription;

use crate::output::{print_json, print_table, OutputFormat};
use crate::{connect, CliResult};

#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    Create(CreateArgs),
    /// List topics.
    List(FormatArg),
    /// Show a topic's partitions and configs.
    Describe {
        /// Topic name.
        name: String,
        #[command(flatten)]
        output: FormatArg,
    },
    /// Delete a topic.
    Delete {
        /// Topic name.
        name: String,
    },
}

/// `--format` accepted after the subcommand too.
#[derive(Debug, Args)]
pub struct FormatArg {
    /// Output format (overrides the global one).
    #[arg(long, value_enum)]
    pub(crate) format: Option<OutputFormat>,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Topic name.
    name: String,
    /// Number of partitions.
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// Replicas per partition (a cluster; default: min(3, nodes)).
    #[arg(long)]
    replication_factor: Option<u16>,
    /// Config override `key=value` (repeatable).
    #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_config)]
    configs: Vec<(String, String)>,
}

fn parse_config(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected key=value, got {text:?}")),
    }
}

pub async fn run(brokers: &[String], format: OutputFormat, command: TopicCommand) -> CliResult {
    let client = connect(brokers).await?;
    match command {
        TopicCommand::Create(args) => {
            client
                .create_topic_replicated(
                    &args.name,
                    args.partitions,
                    args.replication_factor.unwrap_or(0),
                    args.configs,
                )
                .await?;
            println!(
                "created topic {} with {} partition(s)",
                args.name, args.partitions
            );
        }
        TopicCommand::List(output) => {
            let topics = client.list_topics().await?;
            if output.format.unwrap_or(format) == OutputFormat::Json {
                let list: Vec<_> = topics
                    .iter()
                    .map(|topic| json!({"name": topic.name, "partitions": topic.partitions}))
                    .collect();
                return print_json(&json!(list));
            }
            let rows: Vec<Vec<String>> = topics
                .iter()
                .map(|topic| vec![topic.name.clone(), topic.partitions.to_string()])
                .collect();
            print_table(&["TOPIC", "PARTITIONS"], &rows)?;
        }
        TopicCommand::Describe { name, output } => {
            let topic = client.describe_topic(&name).await?;
            match output.format.unwrap_or(format) {
                OutputFormat::Json => print_json(&description_json(&topic))?,
                OutputFormat::Table => print_description(&topic)?,
            }
        }
        TopicCommand::Delete { name } => {
            client.delete_topic(&name).await?;
            println!("deleted topic {name}");
        }
    }
    Ok(())
}

fn description_json(topic: &TopicDescription) -> serde_json::Value {
    let configs: serde_json::Map<String, serde_json::Value> = topic
        .configs
        .iter()
        .map(|(key, value)| (key.clone(), json!(value)))
        .collect();
    let partitions: Vec<_> = topic
        .partitions
        .iter()
        .map(|partition| {
            json!({
                "partition": partition.partition,
                "leader": partition.leader_node,
                "shard": partition.shard,
                "replicas": partition.replicas,
                "in_sync": partition.in_sync,
                "in_sync_replicas": partition.in_sync_replicas,
                "leader_epoch": partition.leader_epoch,
                "log_start_offset": partition.log_start_offset,
                "high_watermark": partition.high_watermark,
                "size_bytes": partition.size_bytes,
                "error": partition.error.to_string(),
            })
        })
        .collect();
    json!({"name": topic.name, "configs": configs, "partitions": partitions})
}

fn print_description(topic: &TopicDescription) -> CliResult {
    crate::output::line(&format!(
        "topic: {}  partitions: {}",
        topic.name,
        topic.partitions.len()
    ))?;
    let rows: Vec<Vec<String>> = topic
        .partitions
        .iter()
        .map(|partition| {
            let replicas: Vec<String> = partition.replicas.iter().map(u32::to_string).collect();
            let in_sync: Vec<String> = partition
                .in_sync_replicas
                .iter()
                .map(u32::to_string)
                .collect();
            vec![
                partition.partition.to_string(),
                partition.leader_node.to_string(),
                replicas.join(","),
                in_sync.join(","),
                partition.leader_epoch.to_string(),
                partition.shard.to_string(),
                partition.log_start_offset.to_string(),
                partition.high_watermark.to_string(),
                partition.size_bytes.to_string(),
                partition.error.to_string(),
            ]
        })
        .collect();
    let headers = [
        "PARTITION",
        "LEADER",
        "REPLICAS",
        "IN-SYNC",
        "EPOCH",
        "SHARD",
        "LOG-START",
        "HIGH-WATERMARK",
        "SIZE-BYTES",
        "ERROR",
    ];
    print_table(&headers, &rows)?;
    if !topic.configs.is_empty() {
        crate::output::line("")?;
        let rows: Vec<Vec<String>> = topic
            .configs
            .iter()
            .map(|(key, value)| vec![key.clone(), value.clone()])
            .collect();
        print_table(&["CONFIG", "VALUE"], &rows)?;
    }
    Ok(())
}
