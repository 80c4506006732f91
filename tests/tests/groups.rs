//! Consumer groups and the idempotent producer, from outside, against real broker
//! (and consumer) processes: members share a topic's partitions, a killed
//! member's partitions move within its session timeout, a joining member moves
//! only what it must while the others keep consuming, a zombie cannot commit,
//! offsets and membership survive a broker crash, a produce whose ack is lost is
//! retried without a duplicate, and the CLI's group commands.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_client::request::GroupHeartbeatRequest;
use sluice_client::{
    AutoOffsetReset, Client, ClientConfig, Error, GroupConsumer, Producer, ProducerConfig,
    ProducerRecord,
};
use sluice_schema::wire;
use sluice_tests::{bin, free_port, scratch, Broker};

/// Short sessions so that the tests run in seconds.
const GROUP_ARGS: [&str; 6] = [
    "--group-min-session-timeout-ms",
    "500",
    "--group-heartbeat-interval-ms",
    "200",
    "--shards",
    "2",
];

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn connect(addr: &str) -> Client {
    Client::connect(ClientConfig::new([addr.to_string()]))
        .await
        .unwrap()
}

/// Produces `per_partition` records to each of `partitions` partitions; returns
/// how many were acknowledged.
async fn produce(client: &Client, topic: &str, partitions: u32, per_partition: u32) -> u64 {
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    let mut acks = Vec::new();
    for i in 0..per_partition {
        for p in 0..partitions {
            let record = ProducerRecord::new(topic.to_string(), format!("r{p}-{i}").into_bytes())
                .with_partition(p);
            acks.push(producer.send(record).await.unwrap());
        }
    }
    let count = acks.len() as u64;
    for ack in acks {
        ack.await.unwrap();
    }
    producer.close().await.unwrap();
    count
}

/// Each member's current assignment, from DescribeGroup.
async fn assignments(client: &Client, group: &str) -> (String, BTreeMap<String, BTreeSet<u32>>) {
    let description = match client.describe_group(group).await {
        Ok(description) => description,
        // Not created yet: its first member is still joining.
        Err(Error::UnknownGroup { .. }) => return ("unknown".into(), BTreeMap::new()),
        Err(error) => panic!("describe {group}: {error}"),
    };
    let members = description
        .members
        .iter()
        .map(|m| {
            let owned = m
                .assignment
                .iter()
                .flat_map(|tp| tp.partitions.iter().copied())
                .collect();
            (m.member_id.clone(), owned)
        })
        .collect();
    (description.state, members)
}

/// Waits until the group is stable with `members` members that together own
/// every one of `partitions` partitions exactly once.
async fn wait_stable(
    client: &Client,
    group: &str,
    members: usize,
    partitions: u32,
    within: Duration,
) -> BTreeMap<String, BTreeSet<u32>> {
    let deadline = Instant::now() + within;
    loop {
        let (state, owned) = assignments(client, group).await;
        let all: Vec<u32> = owned.values().flatten().copied().collect();
        let unique: BTreeSet<u32> = all.iter().copied().collect();
        if state == "stable"
            && owned.len() == members
            && all.len() == partitions as usize
            && unique.len() == partitions as usize
        {
            return owned;
        }
        assert!(
            Instant::now() < deadline,
            "group {group} not stable with {members} members within {within:?}: {state} {owned:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct CliConsumer {
    child: Child,
    out: std::path::PathBuf,
}

impl CliConsumer {
    fn start(broker: &Broker, group: &str, topic: &str, name: &str) -> CliConsumer {
        let out = scratch(name).with_extension("out");
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        let file = std::fs::File::create(&out).unwrap();
        let child = Command::new(bin("sluice"))
            .args([
                "--brokers",
                &broker.brokers(),
                "consume",
                topic,
                "--group",
                group,
                "--session-timeout-ms",
                "2000",
                "--format",
                "%p %o\\n",
            ])
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        CliConsumer { child, out }
    }

    /// `(partition, offset)` pairs it printed.
    fn printed(&self) -> Vec<(u32, u64)> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let (p, o) = line.split_once(' ')?;
                Some((p.parse().ok()?, o.parse().ok()?))
            })
            .collect()
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }
}

impl Drop for CliConsumer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn three_consumer_processes_share_six_partitions_and_a_killed_ones_move_within_its_session() {
    let broker = Broker::start("groups-kill", &GROUP_ARGS);
    broker.cli_ok(&["topic", "create", "orders", "--partitions", "6"], None);
    let rt = runtime();
    let client = rt.block_on(connect(&broker.addr.to_string()));
    let first = rt.block_on(produce(&client, "orders", 6, 500));
    let mut consumers: Vec<CliConsumer> = (0..3)
        .map(|i| CliConsumer::start(&broker, "g", "orders", &format!("groups-kill-c{i}")))
        .collect();
    let owned = rt.block_on(wait_stable(&client, "g", 3, 6, Duration::from_secs(30)));
    assert!(owned.values().all(|set| set.len() == 2), "{owned:?}");

    // kill -9 one member: the other two own all six partitions within its
    // session timeout (2 s) plus a heartbeat interval (0.2 s), with some slack
    // for the coordinator's 250 ms expiry tick.
    let killed = Instant::now();
    consumers[0].child.kill().unwrap();
    consumers[0].child.wait().unwrap();
    let owned = rt.block_on(wait_stable(&client, "g", 2, 6, Duration::from_secs(10)));
    let moved_after = killed.elapsed();
    eprintln!("partitions of the killed member reassigned after {moved_after:?}");
    assert!(
        moved_after < Duration::from_millis(2000 + 200 + 2500),
        "reassigned after {moved_after:?}"
    );
    assert_eq!(owned.values().map(BTreeSet::len).sum::<usize>(), 6);

    // Everything produced before and after the crash is consumed at least once.
    let second = rt.block_on(produce(&client, "orders", 6, 500));
    let expected: BTreeSet<(u32, u64)> = (0..6)
        .flat_map(|p| (0..1000).map(move |o| (p, o)))
        .collect();
    assert_eq!(first + second, expected.len() as u64);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen: BTreeSet<(u32, u64)> = consumers.iter().flat_map(|c| c.printed()).collect();
        if expected.is_subset(&seen) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} records consumed",
            expected.intersection(&seen).count(),
            expected.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // SIGTERM: the survivors commit what they printed and leave cleanly.
    for consumer in &mut consumers[1..] {
        consumer.signal(libc::SIGTERM);
        let status = consumer.child.wait().unwrap();
        assert!(status.success(), "consumer exited with {status}");
    }
    let json = broker.cli_ok(&["group", "describe", "g", "--format", "json"], None);
    let described: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(described["members"].as_array().unwrap().len(), 0, "{json}");
    let rows = described["partitions"].as_array().unwrap();
    assert_eq!(rows.len(), 6);
    for row in rows {
        assert_eq!(row["committed_offset"], 1000, "{row}");
        assert_eq!(row["high_watermark"], 1000);
        assert_eq!(row["lag"], 0);
    }
    // With the group empty, offsets can be reset; the lag then shows it.
    broker.cli_ok(
        &[
            "group",
            "reset-offsets",
            "g",
            "--topic",
            "orders",
            "--to-earliest",
        ],
        None,
    );
    let json = broker.cli_ok(&["group", "describe", "g", "--format", "json"], None);
    let described: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(described["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|row| row["lag"] == 1000));
    let list = broker.cli_ok(&["group", "list", "--format", "json"], None);
    assert!(list.contains("\"g\""), "{list}");
}

#[test]
fn reset_offsets_is_refused_while_the_group_has_members() {
    let broker = Broker::start("groups-reset", &GROUP_ARGS);
    broker.cli_ok(&["topic", "create", "t", "--partitions", "2"], None);
    let _member = CliConsumer::start(&broker, "busy", "t", "groups-reset-c");
    let rt = runtime();
    let client = rt.block_on(connect(&broker.addr.to_string()));
    rt.block_on(wait_stable(&client, "busy", 1, 2, Duration::from_secs(30)));
    let out = broker.cli(
        &[
            "group",
            "reset-offsets",
            "busy",
            "--topic",
            "t",
            "--to-latest",
        ],
        None,
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("member"), "{stderr}");
    let out = broker.cli(&["group", "delete", "busy"], None);
    assert!(!out.status.success());
}

/// Joins `group` as a raw member and heartbeats until it owns partitions.
async fn raw_member(
    client: &Client,
    group: &str,
    topic: &str,
    session_ms: u32,
) -> (String, i32, Vec<u32>) {
    let mut request = GroupHeartbeatRequest {
        group_id: group.into(),
        member_epoch: 0,
        session_timeout_ms: session_ms,
        subscribed_topics: Some(vec![topic.into()]),
        ..GroupHeartbeatRequest::default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = client.group_heartbeat(&request).await.unwrap();
        let owned: Vec<u32> = answer
            .assignment
            .iter()
            .flat_map(|tp| tp.partitions.iter().copied())
            .collect();
        if !owned.is_empty() {
            return (answer.member_id, answer.member_epoch, owned);
        }
        assert!(Instant::now() < deadline, "no assignment");
        request.member_id = answer.member_id;
        request.member_epoch = answer.member_epoch;
        request.subscribed_topics = None;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_zombie_member_paused_past_its_session_cannot_commit() {
    let broker = Broker::start("groups-zombie", &GROUP_ARGS);
    broker.cli_ok(&["topic", "create", "t", "--partitions", "2"], None);
    let rt = runtime();
    rt.block_on(async {
        let client = connect(&broker.addr.to_string()).await;
        let (member, epoch, owned) = raw_member(&client, "z", "t", 1000).await;
        client
            .commit_offsets("z", &member, epoch, [(("t".to_string(), owned[0]), 0)])
            .await
            .expect("a live member commits");
        // Silence for 2.5 s: its session (1 s) expires.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let refused = client
            .commit_offsets("z", &member, epoch, [(("t".to_string(), owned[0]), 5)])
            .await
            .unwrap_err();
        assert!(
            matches!(refused, Error::UnknownMemberId { .. }),
            "{refused:?}"
        );
        let beat = GroupHeartbeatRequest {
            group_id: "z".into(),
            member_id: member.clone(),
            member_epoch: epoch,
            ..GroupHeartbeatRequest::default()
        };
        let refused = client.group_heartbeat(&beat).await.unwrap_err();
        assert!(refused.is_fenced(), "{refused:?}");
        // The committed offset is the one from before the pause.
        let offsets = client.fetch_offsets("z", None).await.unwrap();
        assert_eq!(offsets[&("t".to_string(), owned[0])].offset, Some(0));
        // Committing a partition it does not own is refused too.
        let (member, epoch, owned) = raw_member(&client, "z", "t", 30_000).await;
        let foreign = (0..2).find(|p| !owned.contains(p));
        if let Some(foreign) = foreign {
            let refused = client
                .commit_offsets("z", &member, epoch, [(("t".to_string(), foreign), 1)])
                .await
                .unwrap_err();
            assert!(
                matches!(refused, Error::PartitionNotAssigned { .. }),
                "{refused:?}"
            );
        }
    });
}

#[test]
fn committed_offsets_and_group_membership_survive_a_broker_crash() {
    let broker = Broker::start("groups-restart", &GROUP_ARGS);
    broker.cli_ok(&["topic", "create", "t", "--partitions", "3"], None);
    let rt = runtime();
    let (member, epoch, owned) = rt.block_on(async {
        let client = connect(&broker.addr.to_string()).await;
        let (member, epoch, owned) = raw_member(&client, "keep", "t", 60_000).await;
        let offsets: Vec<_> = owned
            .iter()
            .map(|p| (("t".to_string(), *p), u64::from(*p) * 10 + 7))
            .collect();
        client
            .commit_offsets("keep", &member, epoch, offsets)
            .await
            .unwrap();
        client
            .commit_offsets("other", "", -1, [(("t".to_string(), 0), 42)])
            .await
            .unwrap();
        (member, epoch, owned)
    });
    let mut broker = broker;
    broker.kill9();
    let broker = broker.start_again();
    rt.block_on(async {
        let client = connect(&broker.addr.to_string()).await;
        let offsets = client.fetch_offsets("keep", None).await.unwrap();
        for p in &owned {
            assert_eq!(
                offsets[&("t".to_string(), *p)].offset,
                Some(u64::from(*p) * 10 + 7)
            );
        }
        let other = client.fetch_offsets("other", None).await.unwrap();
        assert_eq!(other[&("t".to_string(), 0)].offset, Some(42));
        // The member is still known, with its epoch and partitions: its next
        // heartbeat goes on as if nothing happened.
        let description = client.describe_group("keep").await.unwrap();
        assert_eq!(description.members.len(), 1);
        assert_eq!(description.members[0].member_id, member);
        let beat = GroupHeartbeatRequest {
            group_id: "keep".into(),
            member_id: member.clone(),
            member_epoch: epoch,
            owned: Some(vec![sluice_client::TopicPartitions {
                topic: "t".into(),
                partitions: owned.clone(),
            }]),
            ..GroupHeartbeatRequest::default()
        };
        let answer = client.group_heartbeat(&beat).await.unwrap();
        assert_eq!(answer.member_epoch, epoch);
        let still: Vec<u32> = answer
            .assignment
            .iter()
            .flat_map(|tp| tp.partitions.iter().copied())
            .collect();
        assert_eq!(still, owned);
        let listed = client.list_groups().await.unwrap();
        let ids: BTreeSet<String> = listed.into_iter().map(|g| g.group_id).collect();
        assert!(ids.contains("keep") && ids.contains("other"), "{ids:?}");
    });
}

#[test]
fn manual_commits_after_processing_lose_nothing_when_a_member_crashes() {
    let broker = Broker::start("groups-manual", &GROUP_ARGS);
    broker.cli_ok(&["topic", "create", "t", "--partitions", "4"], None);
    let addr = broker.addr.to_string();
    let rt = runtime();
    let total = rt.block_on(async {
        let client = connect(&addr).await;
        produce(&client, "t", 4, 300).await
    });
    let processed: Arc<Mutex<BTreeSet<(u32, u64)>>> = Arc::default();
    // Member A processes some records, committing after every 50, then its
    // process "crashes": its runtime is torn down without a commit or a leave.
    {
        let crash_rt = runtime();
        let processed = processed.clone();
        let addr = addr.clone();
        crash_rt.block_on(async move {
            let client = connect(&addr).await;
            let mut a = GroupConsumer::builder(client)
                .group("m")
                .subscribe(["t"])
                .auto_commit(false)
                .session_timeout(Duration::from_millis(1500))
                .build()
                .await
                .unwrap();
            let mut n = 0;
            while n < 530 {
                let record = tokio::time::timeout(Duration::from_secs(20), a.recv())
                    .await
                    .expect("records")
                    .unwrap()
                    .unwrap();
                processed
                    .lock()
                    .unwrap()
                    .insert((record.partition, record.offset));
                n += 1;
                if n % 50 == 0 {
                    a.commit().await.unwrap();
                }
            }
            std::mem::forget(a);
        });
        crash_rt.shutdown_background();
    }
    let after_crash = processed.lock().unwrap().len();
    // Member B takes over from the committed offsets: nothing is skipped.
    rt.block_on(async {
        let client = connect(&addr).await;
        let mut b = GroupConsumer::builder(client.clone())
            .group("m")
            .subscribe(["t"])
            .auto_commit(false)
            .auto_offset_reset(AutoOffsetReset::Earliest)
            .build()
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while (processed.lock().unwrap().len() as u64) < total {
            if Instant::now() > deadline {
                let (state, owned) = assignments(&client, "m").await;
                panic!(
                    "{} of {total} records processed; group {state} {owned:?}",
                    processed.lock().unwrap().len()
                );
            }
            if let Ok(Some(record)) = tokio::time::timeout(Duration::from_secs(1), b.recv()).await {
                let record = record.unwrap();
                processed
                    .lock()
                    .unwrap()
                    .insert((record.partition, record.offset));
            }
        }
        b.commit().await.unwrap();
        b.close().await.unwrap();
    });
    assert_eq!(processed.lock().unwrap().len() as u64, total);
    eprintln!("member A processed {after_crash} records before it crashed; B did the rest");
}

#[test]
fn a_fourth_member_moves_only_what_it_must_while_the_others_keep_consuming() {
    let broker = Broker::start("groups-coop", &GROUP_ARGS);
    broker.cli_ok(&["topic", "create", "t", "--partitions", "6"], None);
    let addr = broker.addr.to_string();
    let rt = runtime();
    let running = Arc::new(AtomicBool::new(true));
    // A producer writes to every partition continuously.
    let producer = {
        let (running, addr) = (running.clone(), addr.clone());
        rt.spawn(async move {
            let client = connect(&addr).await;
            let producer = Producer::new(client, ProducerConfig::default());
            let mut i = 0u64;
            while running.load(Ordering::Relaxed) {
                for p in 0..6 {
                    let record =
                        ProducerRecord::new("t", format!("{i}").into_bytes()).with_partition(p);
                    producer.send_detached(record).await.unwrap();
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            producer.close().await.unwrap();
        })
    };
    // Member index -> partition -> times records arrived.
    type Arrivals = Arc<Mutex<HashMap<usize, HashMap<u32, Vec<Instant>>>>>;
    let arrivals: Arrivals = Arc::default();
    let revoked: Arc<Mutex<Vec<(usize, u32)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let member = |index: usize| {
        let (arrivals, revoked, stop, received, addr) = (
            arrivals.clone(),
            revoked.clone(),
            stop.clone(),
            received.clone(),
            addr.clone(),
        );
        async move {
            let client = connect(&addr).await;
            let hook_revoked = revoked.clone();
            let mut consumer = GroupConsumer::builder(client)
                .group("coop")
                .subscribe(["t"])
                .auto_offset_reset(AutoOffsetReset::Latest)
                .session_timeout(Duration::from_secs(10))
                .on_revoked(move |parts| {
                    let mut revoked = hook_revoked.lock().unwrap();
                    revoked.extend(parts.iter().map(|(_, p)| (index, *p)));
                })
                .build()
                .await
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(Some(record)) =
                    tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await
                {
                    let record = record.unwrap();
                    received.fetch_add(1, Ordering::Relaxed);
                    arrivals
                        .lock()
                        .unwrap()
                        .entry(index)
                        .or_default()
                        .entry(record.partition)
                        .or_default()
                        .push(Instant::now());
                }
            }
            consumer.close().await.unwrap();
        }
    };
    let first: Vec<_> = (0..3).map(|i| rt.spawn(member(i))).collect();
    let client = rt.block_on(connect(&addr));
    let before = rt.block_on(wait_stable(&client, "coop", 3, 6, Duration::from_secs(30)));
    std::thread::sleep(Duration::from_secs(1));
    let revoked_before = revoked.lock().unwrap().len();
    let joined = Instant::now();
    let fourth = rt.spawn(member(3));
    let after = rt.block_on(wait_stable(&client, "coop", 4, 6, Duration::from_secs(30)));
    let rebalance = joined.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    // Revocations up to now (closing the members below revokes everything).
    let revoked_during: Vec<(usize, u32)> = revoked.lock().unwrap()[revoked_before..].to_vec();
    stop.store(true, Ordering::Relaxed);
    running.store(false, Ordering::Relaxed);
    rt.block_on(async {
        for task in first {
            task.await.unwrap();
        }
        fourth.await.unwrap();
        producer.await.unwrap();
    });
    // Only the partitions that moved were revoked: 6 over 4 members is 2, 2, 1,
    // 1, so the newcomer's partitions are all that moves.
    let newcomer = after
        .iter()
        .find(|(id, _)| !before.contains_key(*id))
        .map(|(_, set)| set.len())
        .unwrap();
    let sizes: Vec<usize> = after.values().map(BTreeSet::len).collect();
    assert!(
        sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
        "{after:?}"
    );
    let moved: BTreeSet<u32> = before
        .iter()
        .flat_map(|(id, set)| {
            let now = after.get(id).cloned().unwrap_or_default();
            set.difference(&now).copied().collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(moved.len(), newcomer, "before {before:?} after {after:?}");
    let revoked_partitions: BTreeSet<u32> = revoked_during.iter().map(|(_, p)| *p).collect();
    assert!(
        revoked_partitions.is_subset(&moved),
        "revoked {revoked_during:?}, moved {moved:?}"
    );
    // The partitions that stayed kept flowing: the longest gap between records of
    // one of them, around the join, is far below the rebalance time's scale.
    let arrivals = arrivals.lock().unwrap();
    let window = (
        joined - Duration::from_millis(500),
        joined + rebalance + Duration::from_millis(500),
    );
    let mut worst = Duration::ZERO;
    for partitions in arrivals.values() {
        for (partition, times) in partitions {
            if moved.contains(partition) {
                continue;
            }
            for pair in times.windows(2) {
                if pair[1] > window.0 && pair[0] < window.1 {
                    worst = worst.max(pair[1] - pair[0]);
                }
            }
        }
    }
    eprintln!(
        "the fourth member's join settled in {rebalance:?}; partitions that stayed had a longest gap of {worst:?}; {} records received",
        received.load(Ordering::Relaxed)
    );
    assert!(
        worst < Duration::from_millis(750),
        "a partition that stayed paused for {worst:?}"
    );
}

/// A TCP proxy that forwards everything but swallows the first ProduceResponse
/// and closes that connection (the append happened; its ack is lost).
fn lossy_proxy(listen: SocketAddr, broker: SocketAddr) -> Arc<AtomicU64> {
    let listener = TcpListener::bind(listen).unwrap();
    let dropped = Arc::new(AtomicU64::new(0));
    let dropped_outer = dropped.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(broker) else {
                continue;
            };
            let (mut c_read, mut s_write) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_read, &mut s_write);
                let _ = s_write.shutdown(std::net::Shutdown::Both);
            });
            let dropped = dropped.clone();
            std::thread::spawn(move || {
                let (mut s_read, mut c_write) = (server, client);
                loop {
                    let mut prefix = [0u8; 4];
                    if s_read.read_exact(&mut prefix).is_err() {
                        break;
                    }
                    let length = u32::from_le_bytes(prefix) as usize;
                    let mut rest = vec![0u8; length];
                    if s_read.read_exact(&mut rest).is_err() {
                        break;
                    }
                    let envelope_bytes = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
                    let envelope = &rest[4..4 + envelope_bytes];
                    let is_produce = flatbuffers::root::<wire::Response>(envelope)
                        .is_ok_and(|r| r.body_type() == wire::ResponseBody::ProduceResponse);
                    if is_produce && dropped.fetch_add(1, Ordering::SeqCst) == 0 {
                        let _ = c_write.shutdown(std::net::Shutdown::Both);
                        let _ = s_read.shutdown(std::net::Shutdown::Both);
                        break;
                    }
                    if c_write.write_all(&prefix).is_err() || c_write.write_all(&rest).is_err() {
                        break;
                    }
                }
            });
        }
    });
    dropped_outer
}

/// Produces 100 records in one batch through a proxy that loses the first ack;
/// returns the records the partition then holds.
fn produce_through_lossy_proxy(idempotent: bool, name: &str) -> u64 {
    let proxy_port = free_port();
    let port = proxy_port.to_string();
    let broker = Broker::start(name, &["--shards", "1", "--advertised-port", &port]);
    broker.cli_ok(&["topic", "create", "t", "--partitions", "1"], None);
    // The proxy listens on the port the broker advertises, so every connection
    // the client opens (bootstrap and per shard) goes through it.
    let proxy: SocketAddr = format!("127.0.0.1:{proxy_port}").parse().unwrap();
    let dropped = lossy_proxy(proxy, broker.addr);
    let rt = runtime();
    rt.block_on(async {
        let client = connect(&proxy.to_string()).await;
        let config = ProducerConfig {
            idempotent,
            linger: Duration::from_millis(50),
            ..ProducerConfig::default()
        };
        let producer = Producer::new(client, config);
        let mut acks = Vec::new();
        for i in 0..100 {
            let record = ProducerRecord::new("t", format!("v{i}").into_bytes()).with_partition(0);
            acks.push(producer.send(record).await.unwrap());
        }
        for ack in acks {
            ack.await.expect("delivered after the retry");
        }
        producer.close().await.unwrap();
    });
    assert!(dropped.load(Ordering::SeqCst) >= 1, "the proxy lost an ack");
    let direct = rt.block_on(connect(&broker.addr.to_string()));
    rt.block_on(direct.list_offsets("t", 0, sluice_client::OffsetQuery::Latest))
        .unwrap()
        .offset
}

#[test]
fn a_produce_whose_ack_is_lost_is_retried_without_a_duplicate() {
    assert_eq!(produce_through_lossy_proxy(true, "groups-idempotent"), 100);
    // The same loss without idempotence appends the retried batch again: the
    // proxy does lose an ack after the append.
    assert_eq!(
        produce_through_lossy_proxy(false, "groups-not-idempotent"),
        200
    );
}

/// The heartbeat's response-level error for `request`, sent raw (no client-side
/// checks).
fn raw_heartbeat(raw: &mut sluice_tests::Raw, request: GroupHeartbeatRequest) -> wire::ErrorCode {
    let body = sluice_client::request::RequestBody::GroupHeartbeat(request);
    let reply = raw.request(&body, &[]).expect("an answer");
    let response = reply.response();
    assert_eq!(response.error(), wire::ErrorCode::None, "no envelope error");
    response.body_as_group_heartbeat_response().unwrap().error()
}

#[test]
fn hostile_group_requests_get_typed_errors_and_the_broker_stays_up() {
    let broker = Broker::start("groups-hostile", &GROUP_ARGS);
    broker.cli_ok(&["topic", "create", "t", "--partitions", "2"], None);
    let mut raw = sluice_tests::Raw::open(broker.addr);
    let join = |group: &str| GroupHeartbeatRequest {
        group_id: group.into(),
        member_epoch: 0,
        subscribed_topics: Some(vec!["t".into()]),
        ..GroupHeartbeatRequest::default()
    };
    assert_eq!(
        raw_heartbeat(&mut raw, join("no spaces allowed")),
        wire::ErrorCode::InvalidGroupId
    );
    assert_eq!(
        raw_heartbeat(&mut raw, join(&"g".repeat(300))),
        wire::ErrorCode::InvalidGroupId
    );
    let mut short = join("g");
    short.session_timeout_ms = 1;
    assert_eq!(
        raw_heartbeat(&mut raw, short),
        wire::ErrorCode::InvalidSessionTimeout
    );
    let mut nothing = join("g");
    nothing.subscribed_topics = Some(Vec::new());
    assert_eq!(
        raw_heartbeat(&mut raw, nothing),
        wire::ErrorCode::InvalidRequest
    );
    let mut flood = join("g");
    flood.subscribed_topics = Some((0..5000).map(|i| format!("t{i}")).collect());
    assert_eq!(
        raw_heartbeat(&mut raw, flood),
        wire::ErrorCode::InvalidRequest
    );
    let mut bad_name = join("g");
    bad_name.subscribed_topics = Some(vec!["bad topic".into()]);
    assert_eq!(
        raw_heartbeat(&mut raw, bad_name),
        wire::ErrorCode::InvalidTopicName
    );
    let mut assignor = join("g");
    assignor.assignor = Some("magic".into());
    assert_eq!(
        raw_heartbeat(&mut raw, assignor),
        wire::ErrorCode::InvalidRequest
    );
    let ghost = GroupHeartbeatRequest {
        group_id: "g".into(),
        member_id: "nobody".into(),
        member_epoch: 99,
        ..GroupHeartbeatRequest::default()
    };
    assert_eq!(
        raw_heartbeat(&mut raw, ghost),
        wire::ErrorCode::UnknownMemberId
    );
    let weird = GroupHeartbeatRequest {
        group_id: "g".into(),
        member_epoch: -7,
        ..GroupHeartbeatRequest::default()
    };
    assert_eq!(
        raw_heartbeat(&mut raw, weird),
        wire::ErrorCode::InvalidRequest
    );
    let mut duplicate_owned = join("g");
    duplicate_owned.owned = Some(vec![sluice_client::TopicPartitions {
        topic: "t".into(),
        partitions: vec![0, 0],
    }]);
    assert_eq!(
        raw_heartbeat(&mut raw, duplicate_owned),
        wire::ErrorCode::InvalidRequest
    );
    // A commit naming a topic that does not exist, and deleting an unknown group.
    let rt = runtime();
    rt.block_on(async {
        let client = connect(&broker.addr.to_string()).await;
        let refused = client
            .commit_offsets("g", "", -1, [(("missing".to_string(), 0), 1)])
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            Some(sluice_client::Code::UnknownTopic),
            "{refused:?}"
        );
        let refused = client.delete_group("never-was").await.unwrap_err();
        assert!(matches!(refused, Error::UnknownGroup { .. }), "{refused:?}");
        // Still serving: a real member joins and gets both partitions.
        let (_, _, owned) = raw_member(&client, "fine", "t", 10_000).await;
        assert_eq!(owned.len(), 2);
    });
}

fn stamped_batch(values: &[&[u8]], producer_id: i64, base_sequence: i32) -> bytes::Bytes {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut builder = sluice_client::batch::BatchBuilder::with_capacity(1024);
    for value in values {
        builder.append(now, None, Some(value), &[]).unwrap();
    }
    builder
        .finish_stamped(Some(sluice_client::batch::ProducerStamp {
            producer_id,
            producer_epoch: 0,
            base_sequence,
        }))
        .unwrap()
}

#[test]
fn an_idempotent_batch_resent_after_a_broker_crash_is_not_stored_twice() {
    let broker = Broker::start("groups-idem-restart", &["--shards", "1"]);
    let mut raw = sluice_tests::Raw::open(broker.addr);
    assert_eq!(
        sluice_tests::proto::create(&mut raw, "t", 1, &[]),
        wire::ErrorCode::None
    );
    let first = stamped_batch(&[b"a", b"b", b"c"], 4242, 0);
    let (code, base, message) = sluice_tests::proto::produce(&mut raw, "t", 0, &first, 1);
    assert_eq!(code, wire::ErrorCode::None, "{message}");
    assert_eq!(base, 0);
    let second = stamped_batch(&[b"d", b"e"], 4242, 3);
    let (code, base, _) = sluice_tests::proto::produce(&mut raw, "t", 0, &second, 1);
    assert_eq!((code, base), (wire::ErrorCode::None, 3));
    drop(raw);
    let mut broker = broker;
    broker.kill9();
    let broker = broker.start_again();
    let mut raw = sluice_tests::Raw::open(broker.addr);
    // The retry of the second batch after the crash gets its original offset...
    let (code, base, message) = sluice_tests::proto::produce(&mut raw, "t", 0, &second, 1);
    assert_eq!((code, base), (wire::ErrorCode::None, 3), "{message}");
    // ...a gap is refused...
    let gap = stamped_batch(&[b"x"], 4242, 9);
    let (code, _, _) = sluice_tests::proto::produce(&mut raw, "t", 0, &gap, 1);
    assert_eq!(code, wire::ErrorCode::OutOfOrderSequence);
    // ...and the next batch follows on.
    let third = stamped_batch(&[b"f"], 4242, 5);
    let (code, base, _) = sluice_tests::proto::produce(&mut raw, "t", 0, &third, 1);
    assert_eq!((code, base), (wire::ErrorCode::None, 5));
    let rt = runtime();
    let client = rt.block_on(connect(&broker.addr.to_string()));
    let end = rt
        .block_on(client.list_offsets("t", 0, sluice_client::OffsetQuery::Latest))
        .unwrap();
    assert_eq!(end.offset, 6, "every batch once");
}

#[test]
fn the_offsets_partition_is_compacted_and_offsets_survive_it_and_a_restart() {
    let broker = Broker::start(
        "groups-compaction",
        &["--shards", "1", "--offsets-partitions", "1"],
    );
    broker.cli_ok(&["topic", "create", "t", "--partitions", "100"], None);
    let rt = runtime();
    rt.block_on(async {
        let client = connect(&broker.addr.to_string()).await;
        // 150 commits of 100 partitions: 15,000 records for 101 live keys.
        for round in 0..150u64 {
            let offsets: Vec<_> = (0..100u32)
                .map(|p| (("t".to_string(), p), round * 1000 + u64::from(p)))
                .collect();
            client
                .commit_offsets("busy", "", -1, offsets)
                .await
                .unwrap();
        }
    });
    // The coordinator compacts within a tick of its expiry loop.
    let deadline = Instant::now() + Duration::from_secs(20);
    let log_start = loop {
        let json = broker.cli_ok(
            &["topic", "describe", "__sluice_offsets", "--format", "json"],
            None,
        );
        let described: serde_json::Value = serde_json::from_str(&json).unwrap();
        let start = described["partitions"][0]["log_start_offset"]
            .as_u64()
            .unwrap();
        if start > 0 {
            break start;
        }
        assert!(Instant::now() < deadline, "never compacted: {json}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(log_start >= 10_000, "log start {log_start}");
    let check = |broker: &Broker| {
        rt.block_on(async {
            let client = connect(&broker.addr.to_string()).await;
            let offsets = client.fetch_offsets("busy", None).await.unwrap();
            assert_eq!(offsets.len(), 100);
            for p in 0..100u32 {
                assert_eq!(
                    offsets[&("t".to_string(), p)].offset,
                    Some(149_000 + u64::from(p))
                );
            }
        })
    };
    check(&broker);
    // Only the coordinator writes group state: a client's records there would be
    // read back as members and offsets.
    let output = broker.cli(
        &[
            "produce",
            "__sluice_offsets",
            "--partition",
            "0",
            "--acks",
            "1",
        ],
        Some("forged\n"),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("internal"), "{stderr}");
    let mut broker = broker;
    broker.kill9();
    let broker = broker.start_again();
    check(&broker);
}
