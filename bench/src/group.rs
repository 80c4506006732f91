//! `consume --group`: consumers join one consumer group one at a time while a
//! producer writes to every partition; for each join, how long until the group is
//! stable again (every partition owned by exactly one member, every member at the
//! target) and until the newcomer receives its first record.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use sluice_client::{
    AutoOffsetReset, Client, ClientConfig, GroupConsumer, Producer, ProducerConfig, ProducerRecord,
};

use crate::load::Workload;
use crate::report::Placement;

/// One join.
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    /// Members after the join.
    pub members: usize,
    /// From the newcomer's `build()` to a stable group, ms.
    pub rebalance_ms: f64,
    /// From `build()` to the newcomer's first record, ms.
    pub first_record_ms: f64,
    /// Partitions the newcomer owns at the end of the step.
    pub newcomer_partitions: usize,
    /// Records the group consumed per second over the second after the join.
    pub records_per_sec_after: f64,
}

async fn stable(client: &Client, group: &str, members: usize, partitions: u32) -> bool {
    let Ok(description) = client.describe_group(group).await else {
        return false;
    };
    let owned: Vec<u32> = description
        .members
        .iter()
        .flat_map(|m| m.assignment.iter().flat_map(|tp| tp.partitions.clone()))
        .collect();
    let unique: BTreeSet<u32> = owned.iter().copied().collect();
    description.state == "stable"
        && description.members.len() == members
        && owned.len() == partitions as usize
        && unique.len() == partitions as usize
}

/// Runs the joins and prints a table.
pub async fn run(brokers: &str, workload: &Workload, group: &str) -> Result<Vec<Step>, String> {
    let partitions = workload.partitions.max(1);
    let members = workload.consumers.max(1);
    let client = Client::connect(ClientConfig::new(brokers.split(',').map(str::to_owned)))
        .await
        .map_err(|e| e.to_string())?;
    let topic = format!("bench-group-{}", std::process::id());
    client
        .create_topic_replicated(&topic, partitions, workload.replication_factor, Vec::new())
        .await
        .map_err(|e| format!("creating {topic}: {e}"))?;
    let running = Arc::new(AtomicBool::new(true));
    let producer = {
        let (client, topic, running) = (client.clone(), topic.clone(), running.clone());
        let value = vec![0x5a_u8; workload.message_bytes];
        tokio::spawn(async move {
            let producer = Producer::new(client, ProducerConfig::default());
            while running.load(Ordering::Relaxed) {
                for p in 0..partitions {
                    let record =
                        ProducerRecord::new(topic.clone(), value.clone()).with_partition(p);
                    if producer.send_detached(record).await.is_err() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let _ = producer.close().await;
        })
    };
    let consumed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let mut steps = Vec::new();
    println!(
        "{:>8} {:>14} {:>18} {:>12} {:>16}",
        "members", "rebalance ms", "first record ms", "partitions", "records/s after"
    );
    for k in 1..=members {
        // Members heartbeat once a second when the group is stable: join at a
        // random phase of that, as a real newcomer would.
        let phase = rand::random::<u64>() % 1000;
        tokio::time::sleep(Duration::from_millis(phase)).await;
        let started = Instant::now();
        let first_record = Arc::new(AtomicU64::new(0));
        let owned = Arc::new(AtomicU64::new(0));
        let member = {
            let client = Client::connect(ClientConfig::new(brokers.split(',').map(str::to_owned)))
                .await
                .map_err(|e| e.to_string())?;
            GroupConsumer::builder(client)
                .group(group)
                .subscribe([topic.clone()])
                .auto_offset_reset(AutoOffsetReset::Latest)
                .build()
                .await
                .map_err(|e| format!("member {k} could not join: {e}"))?
        };
        let (consumed_k, stop_k, first_k, owned_k) = (
            consumed.clone(),
            stop.clone(),
            first_record.clone(),
            owned.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut member = member;
            while !stop_k.load(Ordering::Relaxed) {
                if let Ok(Some(Ok(_))) =
                    tokio::time::timeout(Duration::from_millis(100), member.recv()).await
                {
                    if first_k.load(Ordering::Relaxed) == 0 {
                        first_k.store(
                            started.elapsed().as_micros().max(1) as u64,
                            Ordering::Relaxed,
                        );
                    }
                    consumed_k.fetch_add(1, Ordering::Relaxed);
                }
                owned_k.store(member.assignment().len() as u64, Ordering::Relaxed);
            }
            let _ = member.close().await;
        }));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !stable(&client, group, k, partitions).await {
            if Instant::now() > deadline {
                return Err(format!(
                    "the group did not settle with {k} members within 60 s"
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let rebalance_ms = started.elapsed().as_secs_f64() * 1e3;
        while first_record.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let first_record_ms = first_record.load(Ordering::Relaxed) as f64 / 1e3;
        let before = consumed.load(Ordering::Relaxed);
        let window = Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rate =
            (consumed.load(Ordering::Relaxed) - before) as f64 / window.elapsed().as_secs_f64();
        let step = Step {
            members: k,
            rebalance_ms,
            first_record_ms,
            newcomer_partitions: owned.load(Ordering::Relaxed) as usize,
            records_per_sec_after: rate,
        };
        println!(
            "{:>8} {:>14.1} {:>18.1} {:>12} {:>16.0}",
            step.members,
            step.rebalance_ms,
            step.first_record_ms,
            step.newcomer_partitions,
            step.records_per_sec_after
        );
        steps.push(step);
    }
    stop.store(true, Ordering::Relaxed);
    running.store(false, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    let _ = producer.await;
    let _ = client.delete_topic(&topic).await;
    Ok(steps)
}

/// Writes the steps with the placement and workload.
pub fn write_json(
    path: &Path,
    placement: &Placement,
    workload: &Workload,
    steps: &[Step],
) -> Result<(), String> {
    let document = serde_json::json!({
        "command": "consume --group",
        "placement": placement,
        "workload": workload,
        "steps": steps,
    });
    let text = serde_json::to_string_pretty(&document).map_err(|e| e.to_string())?;
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}
