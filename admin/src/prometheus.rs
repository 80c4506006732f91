//! Partition-, group- and node-level metrics gathered from the node through the
//! client on each scrape (the shard-level ones come from the broker's atomics).

use std::collections::HashMap;
use std::fmt::Write as _;

use sluice_client::Client;

/// Label value escaping (Prometheus text format).
pub fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Appends partition and group metrics. Failures are reported as
/// `sluice_admin_scrape_errors` rather than failing the scrape.
pub async fn gather(client: &Client, cluster: bool, out: &mut String) {
    let mut errors = 0u32;
    let mut high_watermarks: HashMap<(String, u32), u64> = HashMap::new();
    match client.describe_topics(&[]).await {
        Ok(topics) => {
            let mut hw = String::new();
            let mut start = String::new();
            let mut size = String::new();
            let mut replicas = String::new();
            let mut in_sync = String::new();
            let mut under = 0u64;
            for topic in &topics {
                let t = label(&topic.name);
                for p in &topic.partitions {
                    high_watermarks.insert((topic.name.clone(), p.partition), p.high_watermark);
                    let labels = format!("topic=\"{t}\",partition=\"{}\"", p.partition);
                    let _ = writeln!(
                        hw,
                        "sluice_partition_high_watermark{{{labels}}} {}",
                        p.high_watermark
                    );
                    let _ = writeln!(
                        start,
                        "sluice_partition_log_start_offset{{{labels}}} {}",
                        p.log_start_offset
                    );
                    let _ = writeln!(
                        size,
                        "sluice_partition_size_bytes{{{labels}}} {}",
                        p.size_bytes
                    );
                    if cluster {
                        let _ = writeln!(
                            replicas,
                            "sluice_partition_replicas{{{labels}}} {}",
                            p.replicas.len()
                        );
                        let _ = writeln!(
                            in_sync,
                            "sluice_partition_in_sync_replicas{{{labels}}} {}",
                            p.in_sync
                        );
                        if usize::from(p.in_sync) < p.replicas.len() {
                            under += 1;
                        }
                    }
                }
            }
            let _ = writeln!(out, "# HELP sluice_partition_high_watermark Offset the next record of the partition will get.\n# TYPE sluice_partition_high_watermark gauge\n{hw}");
            let _ = writeln!(out, "# HELP sluice_partition_log_start_offset First offset still in the partition's log.\n# TYPE sluice_partition_log_start_offset gauge\n{start}");
            let _ = writeln!(out, "# HELP sluice_partition_size_bytes Bytes of the partition's live batches.\n# TYPE sluice_partition_size_bytes gauge\n{size}");
            if cluster {
                let _ = writeln!(out, "# HELP sluice_partition_replicas Replicas of the partition.\n# TYPE sluice_partition_replicas gauge\n{replicas}");
                let _ = writeln!(out, "# HELP sluice_partition_in_sync_replicas Replicas caught up with the commit point, as the leader reports.\n# TYPE sluice_partition_in_sync_replicas gauge\n{in_sync}");
                let _ = writeln!(out, "# HELP sluice_under_replicated_partitions Partitions with fewer in-sync replicas than replicas.\n# TYPE sluice_under_replicated_partitions gauge\nsluice_under_replicated_partitions {under}");
            }
        }
        Err(_) => errors += 1,
    }
    match client.list_groups().await {
        Ok(groups) => {
            let mut members = String::new();
            let mut lag = String::new();
            let mut committed = String::new();
            for group in &groups {
                let g = label(&group.group_id);
                let _ = writeln!(
                    members,
                    "sluice_group_members{{group=\"{g}\"}} {}",
                    group.members
                );
                let Ok(description) = client.describe_group(&group.group_id).await else {
                    errors += 1;
                    continue;
                };
                for (topic, offsets) in &description.offsets {
                    for offset in offsets {
                        let Some(at) = offset.offset else { continue };
                        let labels = format!(
                            "group=\"{g}\",topic=\"{}\",partition=\"{}\"",
                            label(topic),
                            offset.partition
                        );
                        let _ =
                            writeln!(committed, "sluice_group_committed_offset{{{labels}}} {at}");
                        if let Some(hw) = high_watermarks.get(&(topic.clone(), offset.partition)) {
                            let _ = writeln!(
                                lag,
                                "sluice_group_lag{{{labels}}} {}",
                                hw.saturating_sub(at)
                            );
                        }
                    }
                }
            }
            let _ = writeln!(out, "# HELP sluice_group_members Members of the consumer group.\n# TYPE sluice_group_members gauge\n{members}");
            let _ = writeln!(out, "# HELP sluice_group_committed_offset The group's committed offset (next to consume).\n# TYPE sluice_group_committed_offset gauge\n{committed}");
            let _ = writeln!(out, "# HELP sluice_group_lag High watermark minus the committed offset.\n# TYPE sluice_group_lag gauge\n{lag}");
        }
        Err(_) => errors += 1,
    }
    let _ = writeln!(out, "# HELP sluice_admin_scrape_errors Requests to the node that failed while gathering this scrape.\n# TYPE sluice_admin_scrape_errors gauge\nsluice_admin_scrape_errors {errors}");
}
