//! A deterministic simulation of one replicated partition: three replicas over a
//! simulated network (delays, drops, partitions) and simulated disks (writes that
//! complete late, crashes that lose what was not durable), driven from a seed.
//!
//! It checks the partition state machine's invariants after every step:
//! - offsets follow indexes: every replica's durable log is contiguous in offsets,
//!   and a data entry's frame says the offsets its position in the log implies;
//! - the high watermark never moves back (within one life of a replica) and never
//!   passes the durable end of its log;
//! - committed entries are never truncated (`RaftLog::append` asserts it);
//! - at the end, with the faults healed: every replica's log is the same, and
//!   every `acks=all` acknowledgement names records that are there, at the
//!   acknowledged offsets.
//!
//! A failing run prints its seed; `SLUICE_SIM_SEED=<seed>` replays it.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use raft::eraftpb::{Entry, Message};

use super::raft_log::Recovered;
use super::replica::{AckMode, AckSlot, Acked, GroupId, Replica, ReplicaConfig};
use crate::storage::format::{self, BatchInfo};
use crate::storage::{Control, LogWrite};
use crate::types::{LogId, NodeId};

const LOG: LogId = LogId(9);
const NODES: [u32; 3] = [1, 2, 3];

/// A tiny deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A replica's disk: what is durable, and writes still in flight.
#[derive(Default)]
struct Disk {
    /// (index, term, frame, base offset, end offset), in index order.
    entries: Vec<(u64, u64, Bytes, u64, u64)>,
    first_index: u64,
    start_term: u64,
    start_offset: u64,
    hard_state: crate::storage::HardState,
    commit_offset: u64,
    /// (due step, ready number, last index, write, messages to send after).
    in_flight: VecDeque<(u64, u64, u64, LogWrite, Vec<Message>)>,
}

impl Disk {
    fn apply(&mut self, write: &LogWrite) {
        match &write.truncate {
            Some(Control::Truncate {
                index,
                offset,
                reset,
                prev_term,
            }) => {
                if *reset {
                    self.entries.clear();
                    self.first_index = *index;
                    self.start_term = *prev_term;
                    self.start_offset = *offset;
                } else {
                    self.entries.retain(|e| e.0 < *index);
                }
            }
            Some(other) => panic!("not a truncation: {other:?}"),
            None => {}
        }
        for frame in &write.frames {
            let expected = self.entries.last().map_or(self.first_index, |e| e.0 + 1);
            assert_eq!(frame.index, expected, "entries continue the durable log");
            let offset = self.entries.last().map_or(self.start_offset, |e| e.4);
            assert_eq!(frame.base_offset, offset, "offsets follow indexes");
            self.entries.push((
                frame.index,
                frame.term,
                frame.frame.clone(),
                frame.base_offset,
                frame.end_offset,
            ));
        }
        if let Some(Control::State { hard_state, anchor }) = &write.state {
            self.hard_state = *hard_state;
            self.commit_offset = self.commit_offset.max(anchor.commit_offset);
        }
    }

    fn end_offset(&self) -> u64 {
        self.entries.last().map_or(self.start_offset, |e| e.4)
    }

    fn recovered(&self) -> (Recovered, u64, u64) {
        let last_index = self.entries.last().map_or(self.first_index - 1, |e| e.0);
        let mut terms: Vec<(u64, u64)> = Vec::new();
        for (index, term, ..) in &self.entries {
            if terms.last().is_none_or(|(_, t)| t != term) {
                terms.push((*index, *term));
            }
        }
        let commit = self.hard_state.commit.min(last_index);
        // The commit offset the durable hard state pairs with.
        let commit_offset = self
            .entries
            .iter()
            .find(|e| e.0 == commit)
            .map_or(self.start_offset, |e| e.4)
            .min(self.commit_offset.max(self.start_offset));
        let uncommitted: Vec<Entry> = self
            .entries
            .iter()
            .filter(|e| e.0 > commit)
            .map(|e| super::replica::frame_entry(e.0, e.2.clone()).unwrap())
            .collect();
        let recovered = Recovered {
            first_index: self.first_index,
            last_index,
            start_term: self.start_term,
            terms,
            hard_state: crate::storage::HardState {
                commit,
                ..self.hard_state
            },
            start_offset: self.start_offset,
            uncommitted,
        };
        (recovered, self.end_offset(), commit_offset)
    }
}

struct Node {
    id: NodeId,
    replica: Option<Replica>,
    disk: Disk,
    high_watermark: u64,
}

fn start(id: NodeId, disk: &Disk) -> Replica {
    let (recovered, next_offset, commit_offset) = disk.recovered();
    Replica::new(ReplicaConfig {
        group: GroupId::partition(1, 0),
        log: LOG,
        node: id,
        voters: NODES.iter().map(|n| NodeId(*n)).collect(),
        recovered,
        next_offset,
        commit_offset,
        applied: None,
        wants_applied: false,
        campaign: false,
    })
    .unwrap()
}

fn client_batch(rng: &mut Rng, serial: u64) -> (Bytes, BatchInfo) {
    let records = 1 + rng.below(5) as usize;
    let frame = crate::storage::testkit::batch_of_size(serial as i64, records, 8, serial);
    let info = format::verify_client_batch(&frame, usize::MAX).unwrap();
    (Bytes::from(frame), info)
}

/// One simulated run; panics with the seed on a broken invariant.
fn simulate(seed: u64, steps: u64) {
    if std::env::var("SLUICE_SIM_TRACE").is_ok() {
        eprintln!("seed {seed}");
    }
    let mut rng = Rng(seed | 1);
    let mut nodes: Vec<Node> = NODES
        .iter()
        .map(|id| {
            let disk = Disk {
                first_index: 1,
                ..Disk::default()
            };
            Node {
                id: NodeId(*id),
                replica: Some(start(NodeId(*id), &disk)),
                disk,
                high_watermark: 0,
            }
        })
        .collect();
    // (due step, from, to, message)
    let mut network: Vec<(u64, u32, u32, Message)> = Vec::new();
    let mut isolated: Option<u32> = None;
    let mut waiting: Vec<(AckSlot, Vec<Bytes>, u64)> = Vec::new();
    // (term of the leader that acknowledged, end offset acknowledged)
    let mut acked_ends: Vec<(u64, u64)> = Vec::new();
    let mut acked: Vec<(Acked, Vec<Bytes>)> = Vec::new();
    let mut serial = 0u64;
    let healing_from = steps * 3 / 4;
    let quiet_from = steps * 7 / 8;
    for step in 0..steps {
        let faults = step < healing_from;
        if faults && rng.chance(2) {
            isolated = if isolated.is_some() {
                None
            } else {
                Some(NODES[rng.below(3) as usize])
            };
        }
        if !faults {
            isolated = None;
        }
        if faults && rng.chance(1) {
            // A crash: what was not durable is lost; the replica restarts from disk.
            let victim = rng.below(3) as usize;
            let node = &mut nodes[victim];
            if std::env::var("SLUICE_SIM_TRACE").is_ok() {
                let (commit, last, _) = node.replica.as_ref().map_or((0, 0, 0), |r| r.indexes());
                eprintln!(
                    "step {step}: crash node {} (commit {commit}, last {last}, durable last {:?}, hs {:?}, in flight {})",
                    node.id,
                    node.disk.entries.last().map(|e| e.0),
                    node.disk.hard_state,
                    node.disk.in_flight.len()
                );
            }
            node.disk.in_flight.clear();
            node.replica = Some(start(node.id, &node.disk));
            node.high_watermark = 0;
        }
        for node in &mut nodes {
            if let Some(replica) = node.replica.as_mut() {
                replica.tick();
            }
        }
        // Proposals at whoever leads.
        for node in &mut nodes {
            let Some(replica) = node.replica.as_mut() else {
                continue;
            };
            if step < quiet_from && replica.is_leader() && rng.chance(60) {
                let batches: Vec<(Bytes, BatchInfo)> = (0..1 + rng.below(3))
                    .map(|_| {
                        serial += 1;
                        client_batch(&mut rng, serial)
                    })
                    .collect();
                let sent = batches.iter().map(|(b, _)| b.clone()).collect();
                if let Ok(done) = replica.propose(&batches, AckMode::Quorum) {
                    waiting.push((done, sent, replica.term()));
                }
            }
        }
        // Deliver what is due.
        let mut due = Vec::new();
        network.retain(|item| {
            if item.0 <= step {
                due.push(item.clone());
                false
            } else {
                true
            }
        });
        for (_, from, to, message) in due {
            let cut = isolated.is_some_and(|i| i == from || i == to);
            if cut || (faults && rng.chance(5)) {
                continue;
            }
            if let Some(replica) = nodes[(to - 1) as usize].replica.as_mut() {
                let _ = replica.step(message);
            }
        }
        // Readies and disk writes.
        for node in &mut nodes {
            let Some(replica) = node.replica.as_mut() else {
                continue;
            };
            while let Some(out) = replica.ready() {
                for message in out.messages {
                    let delay = rng.below(3);
                    network.push((step + 1 + delay, node.id.0, message.to as u32, message));
                }
                match out.write {
                    Some(write) => {
                        let last = write.frames.last().map_or(0, |f| f.index);
                        let delay = rng.below(3);
                        node.disk.in_flight.push_back((
                            step + delay,
                            out.number,
                            last,
                            write,
                            out.persisted_messages,
                        ));
                    }
                    None => assert!(
                        out.persisted_messages.is_empty(),
                        "seed {seed}: messages that wait for a write without a write"
                    ),
                }
            }
            while node.disk.in_flight.front().is_some_and(|w| w.0 <= step) {
                let Some((_, number, last, write, messages)) = node.disk.in_flight.pop_front()
                else {
                    break;
                };
                node.disk.apply(&write);
                replica.persisted(number, last);
                for message in messages {
                    network.push((step + 1, node.id.0, message.to as u32, message));
                }
            }
            // Older entries raft-rs asked for come from the disk.
            for request in replica.fetch_requests() {
                let entries: Vec<Entry> = node
                    .disk
                    .entries
                    .iter()
                    .filter(|e| e.0 >= request.low && e.0 < request.high)
                    .map(|e| super::replica::frame_entry(e.0, e.2.clone()).unwrap())
                    .collect();
                replica.fetched(request, entries);
            }
            let high_watermark = replica.high_watermark();
            assert!(
                high_watermark >= node.high_watermark,
                "seed {seed}: node {} high watermark moved back {} -> {high_watermark}",
                node.id,
                node.high_watermark
            );
            assert!(
                high_watermark <= node.disk.end_offset(),
                "seed {seed}: node {} high watermark {high_watermark} past its durable end {}",
                node.id,
                node.disk.end_offset()
            );
            node.high_watermark = high_watermark;
            // A leader that serves produce and fetch has everything earlier
            // leaders acknowledged below its high watermark.
            if replica.is_serving_leader() {
                let term = replica.term();
                let earlier = acked_ends
                    .iter()
                    .filter(|(acked_term, _)| *acked_term < term)
                    .map(|(_, end)| *end)
                    .max()
                    .unwrap_or(0);
                assert!(
                    high_watermark >= earlier,
                    "seed {seed}: node {} serves as leader of term {term} with high watermark {high_watermark} below {earlier}, acknowledged in an earlier term",
                    node.id
                );
            }
        }
        waiting.retain(|(done, sent, term)| {
            if !done.is_complete() {
                return true;
            }
            if let Some(Ok(ack)) = done.take() {
                acked_ends.push((*term, ack.end_offset));
                acked.push((ack, sent.clone()));
            }
            false
        });
    }
    check_converged(seed, &nodes, &acked);
}

fn check_converged(seed: u64, nodes: &[Node], acked: &[(Acked, Vec<Bytes>)]) {
    let logs: Vec<BTreeMap<u64, (u64, Vec<u8>)>> = nodes
        .iter()
        .map(|node| {
            node.disk
                .entries
                .iter()
                .filter(|e| e.4 > e.3)
                .map(|e| {
                    (
                        e.3,
                        (e.1, e.2[sluice_schema::batch::PAYLOAD_CRC_START..].to_vec()),
                    )
                })
                .collect()
        })
        .collect();
    if !(logs[0] == logs[1] && logs[1] == logs[2]) {
        for (node, log) in nodes.iter().zip(&logs) {
            eprintln!(
                "node {}: {} batches, last offset {:?}, high watermark {}",
                node.id,
                log.len(),
                log.keys().last(),
                node.high_watermark
            );
        }
        panic!("seed {seed}: the replicas' logs differ after healing");
    }
    for (ack, batches) in acked {
        let mut offset = ack.base_offset;
        for batch in batches {
            let stored = logs[0].get(&offset).unwrap_or_else(|| {
                panic!("seed {seed}: acknowledged batch at offset {offset} is missing")
            });
            assert_eq!(
                stored.1,
                batch[sluice_schema::batch::PAYLOAD_CRC_START..].to_vec(),
                "seed {seed}: offset {offset} holds another batch than the acknowledged one"
            );
            offset += u64::from(format::header(batch).unwrap().record_count.get());
        }
        assert_eq!(offset, ack.end_offset);
    }
    assert!(!acked.is_empty(), "seed {seed}: nothing was acknowledged");
}

#[test]
fn a_partition_keeps_its_invariants_under_faults() {
    if let Some(seed) = std::env::var("SLUICE_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        simulate(seed, 4000);
        return;
    }
    for seed in 1..=24u64 {
        simulate(seed * 0x9e37_79b9, 3000);
    }
}
