//! `sluice group list|describe|reset-offsets|delete`: consumer groups.
//!
//! `describe` prints the members with what they own and, per partition, the
//! committed offset, the high watermark and the lag (high watermark − committed
//! offset). In JSON those rows are the `partitions` array, each with exactly the
//! keys `topic`, `partition`, `committed_offset`, `high_watermark` and `lag`
//! (`null` when unknown: nothing committed, or the partition is unavailable).
//!
//! `reset-offsets` commits new offsets without a member (empty member id, epoch
//! -1); the broker allows that only while the group has no members.

use std::collections::BTreeMap;

use clap::{ArgGroup, Args, Subcommand};
use serde_json::json;
use sluice_client::response::{GroupDescription, GroupSummary};
use sluice_client::{Client, Error, OffsetQuery, TopicPartitions};

use crate::output::{line, print_json, print_table, OutputFormat};
use crate::topic::FormatArg;
use crate::{connect, CliResult};

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// List consumer groups.
    List(FormatArg),
    /// Show a group's members, assignment, committed offsets and lag.
    Describe {
        /// Group id.
        group: String,
        #[command(flatten)]
        output: FormatArg,
    },
    /// Set a group's committed offsets for a topic (only while the group has no
    /// members).
    ResetOffsets(ResetArgs),
    /// Delete a group without members, with its committed offsets.
    Delete {
        /// Group id.
        group: String,
    },
}

#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("to")
        .required(true)
        .args(["to_earliest", "to_latest", "to_offset"])
))]
pub struct ResetArgs {
    /// Group id.
    group: String,
    /// Topic whose offsets to reset.
    #[arg(long)]
    topic: String,
    /// Only this partition (default: all of the topic's partitions).
    #[arg(long)]
    partition: Option<u32>,
    /// To each partition's log start offset.
    #[arg(long)]
    to_earliest: bool,
    /// To each partition's high watermark (skip everything there is now).
    #[arg(long)]
    to_latest: bool,
    /// To this offset (clamped to each partition's log start and high watermark).
    #[arg(long, value_name = "N")]
    to_offset: Option<u64>,
    #[command(flatten)]
    output: FormatArg,
}

pub async fn run(brokers: &[String], format: OutputFormat, command: GroupCommand) -> CliResult {
    let client = connect(brokers).await?;
    match command {
        GroupCommand::List(output) => {
            let groups = client.list_groups().await?;
            print_list(&groups, output.format.unwrap_or(format))
        }
        GroupCommand::Describe { group, output } => {
            let description = client
                .describe_group(&group)
                .await
                .map_err(|error| group_error(&group, error))?;
            let rows = lag_rows(&client, &description).await;
            match output.format.unwrap_or(format) {
                OutputFormat::Json => print_json(&description_json(&description, &rows)),
                OutputFormat::Table => print_description(&description, &rows),
            }
        }
        GroupCommand::ResetOffsets(args) => reset_offsets(&client, format, args).await,
        GroupCommand::Delete { group } => {
            client
                .delete_group(&group)
                .await
                .map_err(|error| group_error(&group, error))?;
            line(&format!("deleted group {group}"))
        }
    }
}

/// The group errors a user can act on, in words.
fn group_error(group: &str, error: Error) -> crate::CliError {
    match error {
        Error::GroupNotEmpty { .. } => format!(
            "group {group} has active members: stop its consumers (or wait until their \
             sessions time out) and try again ({error})"
        )
        .into(),
        Error::UnknownGroup { .. } => format!("there is no group {group} ({error})").into(),
        other => other.into(),
    }
}

fn print_list(groups: &[GroupSummary], format: OutputFormat) -> CliResult {
    if format == OutputFormat::Json {
        let list: Vec<_> = groups
            .iter()
            .map(|group| {
                json!({
                    "group_id": group.group_id,
                    "state": group.state,
                    "members": group.members,
                    "group_epoch": group.group_epoch,
                })
            })
            .collect();
        return print_json(&json!(list));
    }
    let rows: Vec<Vec<String>> = groups
        .iter()
        .map(|group| {
            vec![
                group.group_id.clone(),
                group.state.clone(),
                group.members.to_string(),
                group.group_epoch.to_string(),
            ]
        })
        .collect();
    print_table(&["GROUP", "STATE", "MEMBERS", "EPOCH"], &rows)
}

/// One partition of a described group.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LagRow {
    topic: String,
    partition: u32,
    committed_offset: Option<u64>,
    high_watermark: Option<u64>,
    /// The member owning it now.
    owner: Option<String>,
}

impl LagRow {
    fn lag(&self) -> Option<u64> {
        Some(self.high_watermark?.saturating_sub(self.committed_offset?))
    }
}

/// The partitions with committed offsets or owners, without high watermarks.
fn partition_rows(description: &GroupDescription) -> Vec<LagRow> {
    let mut rows: BTreeMap<(String, u32), LagRow> = BTreeMap::new();
    fn row<'a>(
        rows: &'a mut BTreeMap<(String, u32), LagRow>,
        topic: &str,
        partition: u32,
    ) -> &'a mut LagRow {
        rows.entry((topic.to_owned(), partition))
            .or_insert_with(|| LagRow {
                topic: topic.to_owned(),
                partition,
                committed_offset: None,
                high_watermark: None,
                owner: None,
            })
    }
    for (topic, partitions) in &description.offsets {
        for committed in partitions {
            row(&mut rows, topic, committed.partition).committed_offset = committed.offset;
        }
    }
    for member in &description.members {
        for (topic, partition) in TopicPartitions::pairs(&member.assignment) {
            row(&mut rows, &topic, partition).owner = Some(member.member_id.clone());
        }
    }
    rows.into_values().collect()
}

async fn lag_rows(client: &Client, description: &GroupDescription) -> Vec<LagRow> {
    let mut rows = partition_rows(description);
    for row in &mut rows {
        row.high_watermark = client
            .list_offsets(&row.topic, row.partition, OffsetQuery::Latest)
            .await
            .ok()
            .map(|listed| listed.offset);
    }
    rows
}

fn assignment_text(assignment: &[TopicPartitions]) -> String {
    if assignment.is_empty() {
        return "-".into();
    }
    assignment
        .iter()
        .map(|entry| {
            let partitions: Vec<String> = entry.partitions.iter().map(u32::to_string).collect();
            format!("{}:{}", entry.topic, partitions.join(","))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn assignment_json(assignment: &[TopicPartitions]) -> serde_json::Value {
    json!(assignment
        .iter()
        .map(|entry| json!({"topic": entry.topic, "partitions": entry.partitions}))
        .collect::<Vec<_>>())
}

fn description_json(description: &GroupDescription, rows: &[LagRow]) -> serde_json::Value {
    let members: Vec<_> = description
        .members
        .iter()
        .map(|member| {
            json!({
                "member_id": member.member_id,
                "instance_id": member.instance_id,
                "client_id": member.client_id,
                "member_epoch": member.member_epoch,
                "subscribed_topics": member.subscribed_topics,
                "assignment": assignment_json(&member.assignment),
                "target": assignment_json(&member.target),
                "session_timeout_ms": member.session_timeout_ms,
                "last_heartbeat_ms_ago": member.last_heartbeat_ms_ago,
            })
        })
        .collect();
    let partitions: Vec<_> = rows
        .iter()
        .map(|row| {
            json!({
                "topic": row.topic,
                "partition": row.partition,
                "committed_offset": row.committed_offset,
                "high_watermark": row.high_watermark,
                "lag": row.lag(),
            })
        })
        .collect();
    json!({
        "group_id": description.group_id,
        "state": description.state,
        "group_epoch": description.group_epoch,
        "assignment_epoch": description.assignment_epoch,
        "assignor": description.assignor,
        "members": members,
        "partitions": partitions,
    })
}

fn or_dash(value: Option<impl ToString>) -> String {
    value.map_or_else(|| "-".to_owned(), |value| value.to_string())
}

fn print_description(description: &GroupDescription, rows: &[LagRow]) -> CliResult {
    line(&format!(
        "group: {}  state: {}  epoch: {}  assignment-epoch: {}  assignor: {}  members: {}",
        description.group_id,
        description.state,
        description.group_epoch,
        description.assignment_epoch,
        or_dash(Some(&description.assignor).filter(|a| !a.is_empty())),
        description.members.len()
    ))?;
    if !description.members.is_empty() {
        line("")?;
        let members: Vec<Vec<String>> = description
            .members
            .iter()
            .map(|member| {
                vec![
                    member.member_id.clone(),
                    or_dash(member.instance_id.as_ref()),
                    or_dash(member.client_id.as_ref()),
                    member.member_epoch.to_string(),
                    assignment_text(&member.assignment),
                    assignment_text(&member.target),
                    member.last_heartbeat_ms_ago.to_string(),
                ]
            })
            .collect();
        let headers = [
            "MEMBER-ID",
            "INSTANCE-ID",
            "CLIENT-ID",
            "EPOCH",
            "ASSIGNMENT",
            "TARGET",
            "LAST-HEARTBEAT-MS",
        ];
        print_table(&headers, &members)?;
    }
    if !rows.is_empty() {
        line("")?;
        let table: Vec<Vec<String>> = rows
            .iter()
            .map(|row| {
                vec![
                    row.topic.clone(),
                    row.partition.to_string(),
                    or_dash(row.committed_offset),
                    or_dash(row.high_watermark),
                    or_dash(row.lag()),
                    or_dash(row.owner.as_ref()),
                ]
            })
            .collect();
        let headers = [
            "TOPIC",
            "PARTITION",
            "COMMITTED-OFFSET",
            "HIGH-WATERMARK",
            "LAG",
            "MEMBER-ID",
        ];
        print_table(&headers, &table)?;
    }
    Ok(())
}

/// Where `--to-*` puts a partition whose log spans `[log_start, high_watermark]`.
fn reset_target(args: &ResetArgs, log_start: u64, high_watermark: u64) -> u64 {
    if args.to_earliest {
        log_start
    } else if args.to_latest {
        high_watermark
    } else {
        args.to_offset
            .unwrap_or(log_start)
            .clamp(log_start, high_watermark.max(log_start))
    }
}

async fn reset_offsets(client: &Client, format: OutputFormat, args: ResetArgs) -> CliResult {
    let route = client.topic_route(&args.topic, true).await?;
    let partitions: Vec<u32> = match args.partition {
        Some(partition) if partition >= route.partition_count() => {
            return Err(format!("topic {} has no partition {partition}", args.topic).into())
        }
        Some(partition) => vec![partition],
        None => (0..route.partition_count()).collect(),
    };
    let mut offsets = Vec::with_capacity(partitions.len());
    for partition in partitions {
        let latest = client
            .list_offsets(&args.topic, partition, OffsetQuery::Latest)
            .await?;
        let target = reset_target(&args, latest.log_start_offset, latest.high_watermark);
        if let Some(asked) = args.to_offset.filter(|asked| *asked != target) {
            eprintln!(
                "note: partition {partition} holds offsets {}..{}; using {target} instead of {asked}",
                latest.log_start_offset, latest.high_watermark
            );
        }
        offsets.push(((args.topic.clone(), partition), target));
    }
    client
        .commit_offsets(&args.group, "", -1, offsets.iter().cloned())
        .await
        .map_err(|error| match error {
            Error::GroupNotEmpty { .. } => format!(
                "cannot reset the offsets of group {}: it has active members; stop its \
                 consumers (or wait until their sessions time out) first ({error})",
                args.group
            )
            .into(),
            other => group_error(&args.group, other),
        })?;
    if args.output.format.unwrap_or(format) == OutputFormat::Json {
        let list: Vec<_> = offsets
            .iter()
            .map(|((topic, partition), offset)| {
                json!({"topic": topic, "partition": partition, "offset": offset})
            })
            .collect();
        return print_json(&json!(list));
    }
    line(&format!(
        "reset the offsets of group {} for topic {}:",
        args.group, args.topic
    ))?;
    let rows: Vec<Vec<String>> = offsets
        .iter()
        .map(|((topic, partition), offset)| {
            vec![topic.clone(), partition.to_string(), offset.to_string()]
        })
        .collect();
    print_table(&["TOPIC", "PARTITION", "NEW-OFFSET"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_client::response::{CommittedOffset, GroupMember};

    fn reset(to_earliest: bool, to_latest: bool, to_offset: Option<u64>) -> ResetArgs {
        ResetArgs {
            group: "g".into(),
            topic: "t".into(),
            partition: None,
            to_earliest,
            to_latest,
            to_offset,
            output: FormatArg { format: None },
        }
    }

    #[test]
    fn reset_targets_are_clamped_to_the_log() {
        assert_eq!(reset_target(&reset(true, false, None), 5, 50), 5);
        assert_eq!(reset_target(&reset(false, true, None), 5, 50), 50);
        assert_eq!(reset_target(&reset(false, false, Some(20)), 5, 50), 20);
        assert_eq!(reset_target(&reset(false, false, Some(2)), 5, 50), 5);
        assert_eq!(reset_target(&reset(false, false, Some(99)), 5, 50), 50);
    }

    #[test]
    fn rows_join_commits_and_owners_and_compute_lag() {
        let description = GroupDescription {
            group_id: "g".into(),
            state: "stable".into(),
            members: vec![GroupMember {
                member_id: "m-1".into(),
                instance_id: None,
                client_id: None,
                member_epoch: 3,
                subscribed_topics: vec!["t".into()],
                assignment: vec![TopicPartitions {
                    topic: "t".into(),
                    partitions: vec![0, 1],
                }],
                target: Vec::new(),
                session_timeout_ms: 45_000,
                last_heartbeat_ms_ago: 10,
            }],
            offsets: vec![(
                "t".into(),
                vec![CommittedOffset {
                    partition: 1,
                    offset: Some(7),
                    metadata: None,
                    commit_timestamp_ms: 0,
                }],
            )],
            ..GroupDescription::default()
        };
        let mut rows = partition_rows(&description);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].committed_offset, None);
        assert_eq!(rows[1].committed_offset, Some(7));
        assert_eq!(rows[1].owner.as_deref(), Some("m-1"));
        rows[0].high_watermark = Some(3);
        rows[1].high_watermark = Some(10);
        assert_eq!(rows[0].lag(), None);
        assert_eq!(rows[1].lag(), Some(3));
        let value = description_json(&description, &rows);
        let row = &value["partitions"][1];
        let mut keys: Vec<&str> = row
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "committed_offset",
                "high_watermark",
                "lag",
                "partition",
                "topic"
            ]
        );
        assert_eq!(row["lag"], 3);
        assert_eq!(
            value["partitions"][0]["committed_offset"],
            serde_json::Value::Null
        );
        assert_eq!(value["members"][0]["assignment"][0]["partitions"][1], 1);
    }
}
