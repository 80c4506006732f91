//! A cluster of three real nodes on loopback: replication, failover, a network
//! partition, catch-up, controller failover. Each test stops everything it starts.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sluice_schema::wire::ErrorCode;
use sluice_tests::cluster::{replica_log, Cluster, LoggedBatch};
use sluice_tests::proto::{batch, produce};
use sluice_tests::{bin, scratch, Raw};

const NODE_ARGS: [&str; 2] = ["--shards", "2"];

/// One cluster at a time: three nodes per test already share the machine's cores
/// and disk, and elections under a starved CPU would measure the machine.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `partition offset key value` lines of an ack log, as (partition, offset) -> value.
fn acked(path: &std::path::Path) -> BTreeMap<(u32, u64), String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(4, ' ');
            let partition = parts.next()?.parse().ok()?;
            let offset = parts.next()?.parse().ok()?;
            let _key = parts.next()?;
            let value = parts.next()?.to_string();
            Some(((partition, offset), value))
        })
        .collect()
}

/// Every record of `topic` as node `via` serves it: (partition, offset) -> value.
fn consumed(cluster: &Cluster, via: Option<u32>, topic: &str) -> BTreeMap<(u32, u64), String> {
    let args = ["consume", topic, "--exit-at-end", "--format", "%p %o %v\\n"];
    let output = match via {
        Some(node) => cluster.cli_on(node, &args, None),
        None => cluster.cli(&args, None),
    };
    assert!(
        output.status.success(),
        "consume failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ' ');
            let partition = parts.next()?.parse().ok()?;
            let offset = parts.next()?.parse().ok()?;
            Some(((partition, offset), parts.next().unwrap_or("").to_string()))
        })
        .collect()
}

/// Waits until every partition's high watermark, as the leader reports, reaches
/// `total` records altogether.
fn wait_for_high_watermarks(cluster: &Cluster, topic: &str, total: u64) {
    cluster.wait_for(Duration::from_secs(20), "the high watermarks", |c| {
        c.running().iter().all(|node| {
            c.describe_on(*node, topic).is_some_and(|d| {
                let sum: u64 = d["partitions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p["high_watermark"].as_u64().unwrap())
                    .sum();
                sum == total
            })
        })
    });
}

/// Checks that the replicas' logs (read from their stopped data dirs) are the same
/// up to the smallest high watermark, and returns them.
fn assert_replicas_agree(
    cluster: &Cluster,
    topic: &str,
    partition: u32,
    nodes: &[u32],
) -> Vec<Vec<LoggedBatch>> {
    let logs: Vec<(Vec<LoggedBatch>, u64)> = nodes
        .iter()
        .map(|node| replica_log(cluster.data_dir(*node), topic, partition))
        .collect();
    let high_watermark = logs.iter().map(|(_, hw)| *hw).min().unwrap();
    let committed: Vec<Vec<LoggedBatch>> = logs
        .iter()
        .map(|(log, _)| {
            log.iter()
                .filter(|b| b.end_offset <= high_watermark)
                .cloned()
                .collect()
        })
        .collect();
    for (node, log) in nodes.iter().zip(&committed).skip(1) {
        assert_eq!(
            log, &committed[0],
            "node {node}'s log differs from node {}'s below the high watermark {high_watermark}",
            nodes[0]
        );
    }
    logs.into_iter().map(|(log, _)| log).collect()
}

#[test]
fn three_nodes_replicate_and_every_node_serves_the_same_data() {
    let _serial = serial();
    let cluster = Cluster::start("cluster-basic", 3, &NODE_ARGS);
    cluster.cli_ok(
        &[
            "topic",
            "create",
            "orders",
            "--partitions",
            "3",
            "--replication-factor",
            "3",
        ],
        None,
    );
    let lines: String = (0..3000)
        .map(|i| format!("customer-{}:order {i}\n", i % 97))
        .collect();
    let ack_log = scratch("cluster-basic-acks").join("acks");
    cluster.cli_ok(
        &[
            "produce",
            "orders",
            "--acks",
            "all",
            "--key-separator",
            ":",
            "--ack-log",
            ack_log.to_str().unwrap(),
        ],
        Some(&lines),
    );
    let acknowledged = acked(&ack_log);
    assert_eq!(acknowledged.len(), 3000);
    let partitions: std::collections::BTreeSet<u32> =
        acknowledged.keys().map(|(p, _)| *p).collect();
    assert_eq!(partitions.len(), 3, "keys spread over the partitions");
    // Every node's view: the same records at the same offsets.
    for node in 1..=3 {
        assert_eq!(
            consumed(&cluster, Some(node), "orders"),
            acknowledged,
            "as node {node} serves it"
        );
    }
    wait_for_high_watermarks(&cluster, "orders", 3000);
    for node in 1..=3 {
        let description = cluster.describe_on(node, "orders").unwrap();
        for partition in description["partitions"].as_array().unwrap() {
            assert_eq!(partition["replicas"].as_array().unwrap().len(), 3);
            assert!((1..=3).contains(&partition["leader"].as_u64().unwrap()));
        }
    }
    // Every node names the in-sync replicas: all three.
    cluster.wait_for(Duration::from_secs(10), "every replica in sync", |c| {
        (1..=3).all(|node| {
            c.describe_on(node, "orders").is_some_and(|d| {
                d["partitions"].as_array().unwrap().iter().all(|p| {
                    p["in_sync"].as_u64() == Some(3)
                        && p["in_sync_replicas"] == serde_json::json!([1, 2, 3])
                })
            })
        })
    });
    // A node that does not lead a partition refuses its produce, naming the leader.
    let leader = cluster.leader_of("orders", 0).unwrap();
    let follower = (1..=3).find(|n| *n != leader).unwrap();
    let mut raw = Raw::open(cluster.node(follower).addr);
    let (error, _, message) = produce(&mut raw, "orders", 0, &batch(&[b"misrouted"]), -1);
    assert_eq!(error, ErrorCode::NotLeader, "{message}");
    assert!(message.contains(&cluster.address(leader)), "{message}");
    cluster.wait_for(Duration::from_secs(10), "a fully replicated status", |c| {
        c.status_on(2).is_some_and(|s| {
            s["under_replicated"].as_array().unwrap().is_empty()
                && s["nodes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|n| n["reachable"] == true)
                && s["controller"].as_u64().unwrap() != 0
        })
    });
}

#[test]
fn killing_the_leader_during_acks_all_produce_loses_no_acknowledged_record() {
    let _serial = serial();
    let mut cluster = Cluster::start("cluster-kill", 3, &NODE_ARGS);
    cluster.cli_ok(
        &[
            "topic",
            "create",
            "events",
            "--partitions",
            "1",
            "--replication-factor",
            "3",
        ],
        None,
    );
    let dir = scratch("cluster-kill-acks");
    let mut failovers = Vec::new();
    let mut victims = std::collections::BTreeSet::new();
    let rounds = 20;
    for round in 0..rounds {
        let (leader, _) = cluster.wait_for_leader("events", 0, Duration::from_secs(20));
        victims.insert(leader);
        let ack_log = dir.join(format!("round-{round}"));
        let lines: String = (0..400).map(|i| format!("r{round}-{i}\n")).collect();
        let mut producer = Command::new(bin("sluice"))
            .args([
                "--brokers",
                &cluster.brokers(),
                "produce",
                "events",
                "--acks",
                "all",
                "--linger-ms",
                "5",
            ])
            .args([
                "--ack-log",
                ack_log.to_str().unwrap(),
                "--delivery-timeout-ms",
                "60000",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The records trickle in over at least 400 ms (40 pieces of 10, 10 ms
        // apart), so the kill, 30-190 ms in, always lands while the producer is
        // still producing.
        let mut stdin = producer.stdin.take().unwrap();
        let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let feeder = {
            let written = written.clone();
            let lines: Vec<String> = lines.lines().map(|l| format!("{l}\n")).collect();
            std::thread::spawn(move || {
                for piece in lines.chunks(10) {
                    std::io::Write::write_all(&mut stdin, piece.concat().as_bytes()).unwrap();
                    written.fetch_add(piece.len(), std::sync::atomic::Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        std::thread::sleep(Duration::from_millis(30 + (round as u64 % 5) * 40));
        let killed_at = Instant::now();
        cluster.kill9(leader);
        let written_at_kill = written.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            written_at_kill < 400,
            "round {round}: the kill came after the producer's input ended"
        );
        let (next, _) = cluster.wait_for_leader("events", 0, Duration::from_secs(20));
        failovers.push(killed_at.elapsed());
        eprintln!(
            "round {round}: node {leader} killed, node {next} leads after {:?}",
            killed_at.elapsed()
        );
        assert_ne!(next, leader);
        feeder.join().unwrap();
        let output = producer.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "round {round}: the producer failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        cluster.restart(leader);
    }
    let mut acknowledged = BTreeMap::new();
    for round in 0..rounds {
        acknowledged.extend(acked(&dir.join(format!("round-{round}"))));
    }
    let served = consumed(&cluster, None, "events");
    for (position, value) in &acknowledged {
        assert_eq!(
            served.get(position),
            Some(value),
            "acknowledged record {value:?} at offset {} is not served there",
            position.1
        );
    }
    let produced: std::collections::HashSet<&String> = served.values().collect();
    for round in 0..rounds {
        for i in 0..400 {
            let value = format!("r{round}-{i}");
            assert!(
                produced.contains(&value),
                "{value} was never stored (the producer retries until it is)"
            );
        }
    }
    assert_eq!(
        victims.len(),
        3,
        "leadership moved round the cluster: every node was killed as leader ({victims:?})"
    );
    failovers.sort();
    eprintln!(
        "leader failover after kill -9 (3 nodes, loopback, debug build): median {:?}, max {:?} over {rounds} rounds",
        failovers[failovers.len() / 2],
        failovers[failovers.len() - 1]
    );
    for node in 1..=3 {
        cluster.stop(node);
    }
    assert_replicas_agree(&cluster, "events", 0, &[1, 2, 3]);
}

#[test]
fn a_partitioned_leader_stops_acknowledging_and_its_suffix_is_truncated_on_heal() {
    let _serial = serial();
    let mut cluster = Cluster::start("cluster-partition", 3, &NODE_ARGS);
    cluster.cli_ok(
        &[
            "topic",
            "create",
            "t",
            "--partitions",
            "1",
            "--replication-factor",
            "3",
        ],
        None,
    );
    let (old, _) = cluster.wait_for_leader("t", 0, Duration::from_secs(20));
    let before: String = (0..100).map(|i| format!("before-{i}\n")).collect();
    cluster.cli_ok(&["produce", "t", "--acks", "all"], Some(&before));
    cluster.isolate(old);
    // The minority side: its produce never gets an acks=all acknowledgement.
    let dir = scratch("cluster-partition-acks");
    let minority_log = dir.join("minority");
    let during: String = (0..50).map(|i| format!("minority-{i}\n")).collect();
    let output = cluster.cli_on(
        old,
        &[
            "produce",
            "t",
            "--acks",
            "all",
            "--delivery-timeout-ms",
            "4000",
            "--ack-log",
            minority_log.to_str().unwrap(),
        ],
        Some(&during),
    );
    assert!(
        !output.status.success(),
        "the isolated leader must not acknowledge"
    );
    assert!(
        acked(&minority_log).is_empty(),
        "nothing was acknowledged on the minority side"
    );
    // The majority elects a new leader and goes on.
    let others: Vec<u32> = (1..=3).filter(|n| *n != old).collect();
    let majority_brokers = others
        .iter()
        .map(|n| cluster.address(*n))
        .collect::<Vec<_>>()
        .join(",");
    let majority_log = dir.join("majority");
    let after: String = (0..100).map(|i| format!("after-{i}\n")).collect();
    let output = sluice_tests::run_cli(
        &majority_brokers,
        &[
            "produce",
            "t",
            "--acks",
            "all",
            "--ack-log",
            majority_log.to_str().unwrap(),
        ],
        Some(&after),
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(acked(&majority_log).len(), 100);
    cluster.heal();
    // The old leader rejoins as a follower and catches up.
    cluster.wait_for(Duration::from_secs(20), "the old leader to catch up", |c| {
        c.describe_on(others[0], "t").is_some_and(|d| {
            d["partitions"][0]["in_sync"].as_u64() == Some(3)
                && d["partitions"][0]["high_watermark"].as_u64() == Some(200)
        }) || c.describe_on(others[1], "t").is_some_and(|d| {
            d["partitions"][0]["in_sync"].as_u64() == Some(3)
                && d["partitions"][0]["high_watermark"].as_u64() == Some(200)
        })
    });
    // The deposed leader is fenced: its produce is refused with NotLeader, naming
    // the new leader (of a later epoch).
    let (new_leader, _) = cluster.wait_for_leader("t", 0, Duration::from_secs(20));
    assert_ne!(new_leader, old);
    let mut raw = Raw::open(cluster.node(old).addr);
    let (error, _, message) = produce(&mut raw, "t", 0, &batch(&[b"to-the-old-leader"]), -1);
    assert_eq!(error, ErrorCode::NotLeader, "{message}");
    assert!(
        message.contains(&cluster.address(new_leader)),
        "the refusal names the new leader {}: {message}",
        cluster.address(new_leader)
    );
    let served = consumed(&cluster, None, "t");
    assert_eq!(served.len(), 200, "everything acknowledged, nothing else");
    assert!(served.values().all(|v| !v.starts_with("minority")));
    for node in 1..=3 {
        cluster.stop(node);
    }
    let logs = assert_replicas_agree(&cluster, "t", 0, &[1, 2, 3]);
    // No trace of the minority's unacknowledged entries anywhere, the old leader's
    // log included (its suffix was truncated, durably).
    for log in &logs {
        assert_eq!(
            log.iter()
                .map(|b| b.end_offset - b.base_offset)
                .sum::<u64>(),
            200
        );
    }
}

#[test]
fn a_follower_that_was_down_catches_up_and_can_then_lead() {
    let _serial = serial();
    let mut cluster = Cluster::start("cluster-catch-up", 3, &NODE_ARGS);
    cluster.cli_ok(
        &[
            "topic",
            "create",
            "t",
            "--partitions",
            "1",
            "--replication-factor",
            "3",
        ],
        None,
    );
    let (leader, _) = cluster.wait_for_leader("t", 0, Duration::from_secs(20));
    let follower = (1..=3).find(|n| *n != leader).unwrap();
    cluster.kill9(follower);
    let lines: String = (0..3000)
        .map(|i| format!("while-down-{i} {}\n", "x".repeat(100)))
        .collect();
    cluster.cli_ok(&["produce", "t", "--acks", "all"], Some(&lines));
    // While it is down the partition is under-replicated, and the operator's
    // views say which replica is missing.
    let others: Vec<u64> = (1..=3).filter(|n| *n != follower).map(u64::from).collect();
    cluster.wait_for(Duration::from_secs(20), "an under-replicated status", |c| {
        c.status_on(leader).is_some_and(|s| {
            s["under_replicated"].as_array().unwrap().iter().any(|p| {
                p["topic"] == "t"
                    && p["partition"] == 0
                    && p["in_sync_replicas"]
                        .as_array()
                        .is_some_and(|set| set.iter().filter_map(|n| n.as_u64()).eq(others.clone()))
            })
        })
    });
    let description = cluster.describe_on(leader, "t").unwrap();
    assert_eq!(description["partitions"][0]["in_sync"].as_u64(), Some(2));
    cluster.restart(follower);
    cluster.wait_for(Duration::from_secs(30), "the follower to catch up", |c| {
        c.describe_on(leader, "t").is_some_and(|d| {
            d["partitions"][0]["in_sync"].as_u64() == Some(3)
                && d["partitions"][0]["in_sync_replicas"] == serde_json::json!([1, 2, 3])
        })
    });
    cluster.wait_for(Duration::from_secs(20), "a fully replicated status", |c| {
        c.status_on(follower)
            .is_some_and(|s| s["under_replicated"].as_array().unwrap().is_empty())
    });
    // Kill whoever leads until the caught-up follower is elected (each time a
    // majority, the follower included, remains).
    let mut current = leader;
    for _ in 0..10 {
        cluster.kill9(current);
        let (next, _) = cluster.wait_for_leader("t", 0, Duration::from_secs(20));
        cluster.restart(current);
        if next == follower {
            break;
        }
        cluster.wait_for(
            Duration::from_secs(30),
            "the restarted node to catch up",
            |c| {
                c.describe_on(next, "t")
                    .is_some_and(|d| d["partitions"][0]["in_sync"].as_u64() == Some(3))
            },
        );
        current = next;
    }
    let (now, _) = cluster.wait_for_leader("t", 0, Duration::from_secs(20));
    assert_eq!(now, follower, "the caught-up follower leads");
    let served = consumed(&cluster, Some(follower), "t");
    assert_eq!(served.len(), 3000);
}

#[test]
fn the_controller_fails_over_and_topics_can_still_be_created() {
    let _serial = serial();
    let mut cluster = Cluster::start("cluster-controller", 3, &NODE_ARGS);
    cluster.cli_ok(&["topic", "create", "first", "--partitions", "2"], None);
    // Without --replication-factor: min(3, nodes) replicas, on distinct nodes.
    let description = cluster.describe_on(1, "first").unwrap();
    for partition in description["partitions"].as_array().unwrap() {
        let replicas: std::collections::BTreeSet<u64> = partition["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap())
            .collect();
        assert_eq!(replicas.len(), 3, "default replication factor: {partition}");
    }
    let controller = cluster.controller().unwrap();
    cluster.kill9(controller);
    cluster.wait_for(Duration::from_secs(20), "a new controller", |c| {
        c.controller().is_some_and(|n| n != controller)
    });
    // Asked of the surviving node that is not the controller, which forwards it.
    let new_controller = cluster.controller().unwrap();
    let forwarder = cluster
        .running()
        .into_iter()
        .find(|n| *n != new_controller)
        .unwrap();
    let output = cluster.cli_on(
        forwarder,
        &[
            "topic",
            "create",
            "second",
            "--partitions",
            "3",
            "--replication-factor",
            "2",
        ],
        None,
    );
    assert!(
        output.status.success(),
        "topic create through node {forwarder}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    for node in cluster.running() {
        let description = cluster.describe_on(node, "second").unwrap();
        assert_eq!(description["partitions"].as_array().unwrap().len(), 3);
    }
    // The old controller comes back and learns the topic from the controller log.
    cluster.restart(controller);
    cluster.wait_for(
        Duration::from_secs(20),
        "the restarted node to know the topic",
        |c| c.describe_on(controller, "second").is_some(),
    );
    let lines: String = (0..100).map(|i| format!("{i}\n")).collect();
    cluster.cli_ok(&["produce", "second", "--acks", "all"], Some(&lines));
    assert_eq!(consumed(&cluster, Some(controller), "second").len(), 100);
}

#[test]
fn a_follower_behind_the_leaders_retention_restarts_from_a_snapshot() {
    let _serial = serial();
    let mut cluster = Cluster::start(
        "cluster-snapshot",
        3,
        &[
            "--shards",
            "1",
            "--retention-check-ms",
            "200",
            "--segment-mib",
            "4",
        ],
    );
    cluster.cli_ok(
        &[
            "topic",
            "create",
            "t",
            "--partitions",
            "1",
            "--replication-factor",
            "3",
            "--config",
            "segment.bytes=1048576",
            "--config",
            "retention.bytes=1048576",
        ],
        None,
    );
    let (leader, _) = cluster.wait_for_leader("t", 0, Duration::from_secs(20));
    let follower = (1..=3).find(|n| *n != leader).unwrap();
    cluster.kill9(follower);
    let value = "v".repeat(1000);
    let lines: String = (0..6000).map(|i| format!("{i:06} {value}\n")).collect();
    cluster.cli_ok(&["produce", "t", "--acks", "all"], Some(&lines));
    // Retention drops the oldest entries on the leader: the follower's next entry
    // is gone from its log.
    cluster.wait_for(Duration::from_secs(20), "retention on the leader", |c| {
        c.describe_on(leader, "t")
            .is_some_and(|d| d["partitions"][0]["log_start_offset"].as_u64().unwrap_or(0) > 0)
    });
    cluster.restart(follower);
    cluster.wait_for(Duration::from_secs(30), "the follower to catch up", |c| {
        c.describe_on(leader, "t")
            .is_some_and(|d| d["partitions"][0]["in_sync"].as_u64() == Some(3))
    });
    let on_leader = consumed(&cluster, Some(leader), "t");
    // The follower can lead and serves the same records from the same log start.
    let mut current = leader;
    for _ in 0..10 {
        cluster.kill9(current);
        let (next, _) = cluster.wait_for_leader("t", 0, Duration::from_secs(20));
        cluster.restart(current);
        if next == follower {
            break;
        }
        cluster.wait_for(
            Duration::from_secs(30),
            "the restarted node to catch up",
            |c| {
                c.describe_on(next, "t")
                    .is_some_and(|d| d["partitions"][0]["in_sync"].as_u64() == Some(3))
            },
        );
        current = next;
    }
    assert_eq!(
        cluster.wait_for_leader("t", 0, Duration::from_secs(20)).0,
        follower
    );
    let on_follower = consumed(&cluster, Some(follower), "t");
    let last = on_leader.keys().next_back().unwrap();
    assert_eq!(
        on_follower.get(last),
        on_leader.get(last),
        "the newest record is the same"
    );
    let first = on_follower.keys().next().unwrap().1;
    assert!(
        first > 0,
        "the follower's log starts where the leader's snapshot said"
    );
    assert_eq!(on_follower.keys().next_back(), on_leader.keys().next_back());
    for (position, value) in &on_follower {
        if let Some(expected) = on_leader.get(position) {
            assert_eq!(value, expected, "offset {} differs", position.1);
        }
    }
}

/// A consumer group's coordinator is the leader of its `__sluice_offsets`
/// partition: killing that node moves the group to the new leader, with its
/// committed offsets and its members.
#[test]
fn a_groups_coordinator_fails_over_with_its_committed_offsets_and_members() {
    use sluice_client::request::GroupHeartbeatRequest;
    use sluice_client::{Client, ClientConfig};
    let _serial = serial();
    let mut cluster = Cluster::start("cluster-groups", 3, &NODE_ARGS);
    cluster.cli_ok(
        &[
            "topic",
            "create",
            "orders",
            "--partitions",
            "3",
            "--replication-factor",
            "3",
        ],
        None,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let brokers: Vec<String> = cluster.brokers().split(',').map(str::to_owned).collect();
    let (member, epoch, owned) = rt.block_on(async {
        let client = Client::connect(ClientConfig::new(brokers.clone()))
            .await
            .unwrap();
        let mut request = GroupHeartbeatRequest {
            group_id: "billing".into(),
            member_epoch: 0,
            session_timeout_ms: 60_000,
            subscribed_topics: Some(vec!["orders".into()]),
            ..GroupHeartbeatRequest::default()
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match client.group_heartbeat(&request).await {
                Ok(answer) => {
                    let owned: Vec<u32> = answer
                        .assignment
                        .iter()
                        .flat_map(|tp| tp.partitions.iter().copied())
                        .collect();
                    if owned.len() == 3 {
                        let offsets: Vec<_> = owned
                            .iter()
                            .map(|p| (("orders".to_string(), *p), 100 + u64::from(*p)))
                            .collect();
                        client
                            .commit_offsets(
                                "billing",
                                &answer.member_id,
                                answer.member_epoch,
                                offsets,
                            )
                            .await
                            .unwrap();
                        return (answer.member_id, answer.member_epoch, owned);
                    }
                    request.member_id = answer.member_id;
                    request.member_epoch = answer.member_epoch;
                    request.subscribed_topics = None;
                }
                // The offsets topic is being created and its leaders elected.
                Err(error) if error.is_retriable() => {}
                Err(error) => panic!("heartbeat: {error}"),
            }
            assert!(Instant::now() < deadline, "the member got no assignment");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let partition = sluice_schema::groups::group_partition(
        "billing",
        sluice_schema::groups::OFFSETS_PARTITIONS_DEFAULT,
    );
    let (coordinator, _) =
        cluster.wait_for_leader("__sluice_offsets", partition, Duration::from_secs(10));
    cluster.kill9(coordinator);
    let (successor, took) =
        cluster.wait_for_leader("__sluice_offsets", partition, Duration::from_secs(10));
    assert_ne!(successor, coordinator);
    eprintln!("coordinator moved from node {coordinator} to {successor} in {took:?}");
    let live: Vec<String> = cluster
        .live_brokers()
        .split(',')
        .map(str::to_owned)
        .collect();
    rt.block_on(async {
        let client = Client::connect(ClientConfig::new(live)).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let offsets = loop {
            match client.fetch_offsets("billing", None).await {
                Ok(offsets) => break offsets,
                Err(error) if error.is_retriable() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => panic!("offset fetch after failover: {error}"),
            }
        };
        for p in &owned {
            assert_eq!(
                offsets[&("orders".to_string(), *p)].offset,
                Some(100 + u64::from(*p))
            );
        }
        let description = client.describe_group("billing").await.unwrap();
        assert_eq!(description.members.len(), 1);
        assert_eq!(description.members[0].member_id, member);
        // The member carries on at the new coordinator without a rebalance.
        let beat = GroupHeartbeatRequest {
            group_id: "billing".into(),
            member_id: member.clone(),
            member_epoch: epoch,
            ..GroupHeartbeatRequest::default()
        };
        let answer = client.group_heartbeat(&beat).await.unwrap();
        assert_eq!(answer.member_epoch, epoch);
    });
}
